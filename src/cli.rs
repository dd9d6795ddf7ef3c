//! The command line. Every subcommand opens the database (creating and
//! migrating it as needed), does one thing, and exits 0 on success, 2 on a
//! usage error, 1 on any other failure with a one-line message on stderr.

use std::ffi::OsString;
use std::io::{self, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};

use crate::error::{Error, Result};
use crate::http::{self, App, Server};
use crate::{clock, db, runners, tokens};

#[derive(Debug, Parser)]
#[command(
    name = "comfy-runners",
    version,
    about = "A self-hosted registry of ComfyUI runners on one SQLite file"
)]
struct Cli {
    /// The database file (created on first use).
    #[arg(
        long,
        global = true,
        env = "COMFY_RUNNERS_DB",
        default_value = "comfy-runners.db"
    )]
    db: PathBuf,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the HTTP API.
    Serve {
        /// Address to listen on; port 0 picks a free port.
        #[arg(long, env = "COMFY_RUNNERS_LISTEN", default_value = "127.0.0.1:8189")]
        listen: String,
        /// Worker threads answering requests (default: twice the CPUs, at least 4).
        #[arg(long, env = "COMFY_RUNNERS_WORKERS", value_parser = clap::value_parser!(u16).range(1..=256))]
        workers: Option<u16>,
    },
    /// Create, list and revoke API tokens.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Export and import a user's runners.
    Runner {
        #[command(subcommand)]
        command: RunnerCommand,
    },
}

#[derive(Debug, Subcommand)]
enum TokenCommand {
    /// Create a token (and the user, if needed); prints the token alone.
    Create {
        /// The user the token acts as.
        #[arg(long)]
        user: String,
        /// A label for the token.
        #[arg(long, default_value = "")]
        name: String,
        /// Lifetime, like 90d, 12h, 30m or 45s (default: no expiry).
        #[arg(long, value_parser = parse_duration)]
        expires_in: Option<i64>,
    },
    /// List tokens (never the tokens themselves).
    List {
        /// Only this user's tokens.
        #[arg(long)]
        user: Option<String>,
        /// Print a JSON array instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Revoke a token by its id; takes effect on the next request.
    Revoke {
        /// The token's id, from `token list`.
        id: String,
    },
}

#[derive(Debug, Subcommand)]
enum RunnerCommand {
    /// Print all of a user's runners as {"runners": [...], "total": N}, newest first.
    Export {
        #[arg(long)]
        user: String,
    },
    /// Import runners from a file (- for stdin): all of them, or none.
    Import {
        /// The user who will own them (created if needed).
        #[arg(long)]
        user: String,
        /// {"runners": [...]} or a JSON array of runners.
        file: PathBuf,
    },
}

/// `90d`, `12h`, `30m`, `45s` to seconds.
fn parse_duration(s: &str) -> std::result::Result<i64, String> {
    let bad = || format!("{s:?} is not a duration like 90d, 12h, 30m or 45s");
    let unit = match s.chars().last() {
        Some('d') => 86_400,
        Some('h') => 3_600,
        Some('m') => 60,
        Some('s') => 1,
        _ => return Err(bad()),
    };
    let digits = &s[..s.len() - 1];
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    match digits.parse::<i64>().ok().and_then(|n| n.checked_mul(unit)) {
        Some(0) => Err("a duration must be longer than zero".into()),
        Some(secs) if secs <= 100 * 365 * 86_400 => Ok(secs),
        _ => Err(format!("{s:?} is too long (at most 100 years)")),
    }
}

/// Parses `args` and runs the command.
pub fn run<I: IntoIterator<Item = OsString>>(args: I) -> ExitCode {
    let cli = match Cli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(e.exit_code().clamp(0, 255) as u8);
        }
    };
    match execute(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("comfy-runners: {e}");
            ExitCode::from(1)
        }
    }
}

fn execute(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Serve { listen, workers } => serve(&cli.db, &listen, workers),
        Command::Token { command } => token(&cli.db, command),
        Command::Runner { command } => runner(&cli.db, command),
    }
}

fn default_workers() -> usize {
    let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
    (cpus * 2).max(4)
}

fn serve(path: &Path, listen: &str, workers: Option<u16>) -> Result<()> {
    let mut conn = db::open(path)?;
    // Bind before anything else is printed or created: an address in use is
    // one line, and must not spend the first start's token.
    let listener = http::bind(listen)
        .map_err(|e| Error::Invalid(format!("cannot listen on {listen}: {e}")))?;
    if let Some(secret) = tokens::bootstrap(&mut conn)? {
        eprintln!(
            "created user {} with API token (shown only this once):\n{}",
            tokens::BOOTSTRAP_USER,
            secret.expose()
        );
    }
    drop(conn);
    let workers = workers.map_or_else(default_workers, usize::from);
    // One connection per worker, and one for bookkeeping after answers.
    let pool = db::pool(path, workers as u32 + 1)?;
    let server = Server::start(listener, workers, Arc::new(App::new(pool)))?;
    eprintln!("listening on http://{}", server.addr());

    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
    ])?;
    let stopper = server.stopper();
    let handle = signals.handle();
    let watcher = std::thread::spawn(move || {
        if signals.forever().next().is_some() {
            stopper.stop();
        }
    });
    let ok = server.join();
    handle.close();
    let _ = watcher.join();
    if ok {
        Ok(())
    } else {
        Err(Error::Internal(
            "stopped: the server could no longer accept connections".into(),
        ))
    }
}

fn token(path: &Path, command: TokenCommand) -> Result<()> {
    let mut conn = db::open(path)?;
    match command {
        TokenCommand::Create {
            user,
            name,
            expires_in,
        } => {
            let (_, secret) = tokens::create(&mut conn, &user, &name, expires_in)?;
            println!("{}", secret.expose());
        }
        TokenCommand::List { user, json } => {
            let list = tokens::list(&conn, user.as_deref())?;
            let mut out = io::stdout().lock();
            if json {
                serde_json::to_writer_pretty(&mut out, &list)
                    .map_err(|e| Error::Internal(e.to_string()))?;
                writeln!(out)?;
            } else {
                print_table(&mut out, &list)?;
            }
        }
        TokenCommand::Revoke { id } => match tokens::revoke(&conn, &id)? {
            tokens::Revoked::Now => println!("revoked {id}"),
            tokens::Revoked::Already => println!("{id} was already revoked"),
        },
    }
    Ok(())
}

fn print_table(out: &mut dyn Write, list: &[tokens::TokenInfo]) -> io::Result<()> {
    let time = |t: Option<i64>| t.map_or_else(|| "-".to_string(), clock::format);
    let label = |s: &str| {
        if s.is_empty() {
            "-".to_string()
        } else {
            s.to_string()
        }
    };
    let mut rows = vec![[
        "ID",
        "USER",
        "LABEL",
        "CREATED",
        "EXPIRES",
        "LAST USED",
        "REVOKED",
    ]
    .map(String::from)];
    for t in list {
        rows.push([
            t.id.clone(),
            t.user.clone(),
            label(&t.name),
            clock::format(t.created_at),
            time(t.expires_at),
            time(t.last_used_at),
            time(t.revoked_at),
        ]);
    }
    let mut widths = [0usize; 7];
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    for row in &rows {
        let line: Vec<String> = row
            .iter()
            .zip(widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        writeln!(out, "{}", line.join("  ").trim_end())?;
    }
    Ok(())
}

fn runner(path: &Path, command: RunnerCommand) -> Result<()> {
    let mut conn = db::open(path)?;
    match command {
        RunnerCommand::Export { user } => {
            let owner = tokens::find_user(&conn, &user)?
                .ok_or_else(|| Error::Invalid(format!("no user named {user:?}")))?;
            let mut out = BufWriter::with_capacity(1 << 16, io::stdout().lock());
            runners::export(&conn, owner.id, &mut out)?;
            out.flush()?;
        }
        RunnerCommand::Import { user, file } => {
            let mut input = Vec::new();
            let read = if file.as_os_str() == "-" {
                io::stdin().lock().read_to_end(&mut input)
            } else {
                std::fs::File::open(&file).and_then(|mut f| f.read_to_end(&mut input))
            };
            read.map_err(|e| Error::Invalid(format!("cannot read {}: {e}", file.display())))?;
            let n = runners::import(&mut conn, &user, &input, clock::now())?;
            println!("imported {n} runners");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::parse_duration;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90d"), Ok(90 * 86_400));
        assert_eq!(parse_duration("12h"), Ok(12 * 3_600));
        assert_eq!(parse_duration("30m"), Ok(1_800));
        assert_eq!(parse_duration("45s"), Ok(45));
        for bad in [
            "",
            "d",
            "10",
            "1w",
            "-1d",
            "1.5h",
            " 1h",
            "0s",
            "99999999999999999999d",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
    }
}
