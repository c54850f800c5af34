//! Configuration: the files as written ([`file`](mod@file)), and the validated model ([`validate`]).
//!
//! Loading is two steps: read and parse every file (I/O, parse errors become problems), then
//! validate the parsed mirrors with pure functions that report every problem at once, each with
//! its file and key path.

pub mod file;
pub mod model;
pub mod validate;
pub mod warnings;

pub use model::*;
pub use validate::{Problem, SecretSource, load, load_with};
