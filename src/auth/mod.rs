//! Inbound caller authentication (JWT + JWKS) and upstream credentials.
pub mod jwks;
pub mod jwt;
pub mod upstream;
