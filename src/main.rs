//! The `comfy-runners` binary: everything lives in the library.

fn main() -> std::process::ExitCode {
    comfy_runners::cli::run(std::env::args_os())
}
