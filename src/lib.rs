//! comfy-runners: a self-hosted registry of ComfyUI instances ("runners") on
//! one SQLite file, speaking the runner API of the hosted ComfyControl service.
//!
//! The modules, from the outside in:

/// The command line: `serve`, `token ...`, `runner ...`.
pub mod cli;
/// Time: now, and the one timestamp format of the API.
pub mod clock;
/// The database: the pool, per-connection settings, schema and migrations.
pub mod db;
/// The one error type, with its HTTP status and public message.
pub mod error;
/// The HTTP layer: socket, workers, routing, handlers. The only module that knows tiny_http.
pub mod http;
/// The runner domain: the runner object, its validation, its SQL, import and export.
pub mod runners;
/// Users and API tokens: minting, hashing, lookup, revocation, last-used tracking.
pub mod tokens;

pub use error::Error;
