//! greenhouse-gateway: an authenticating reverse proxy for the Greenhouse Candidate Ingestion
//! (Partner) API.
//!
//! The request path, in order (see [`pipeline`], where it fits on one screen):
//! 1. framing, target, header and body-size sanity ([`server`], [`pipeline`]);
//! 2. the caller's bearer JWT is verified against its issuer's keys ([`auth::jwt`]);
//! 3. the route is found in the OpenAPI spec ([`spec`]);
//! 4. the caller's team, the operation allow-list and `On-Behalf-Of` are decided ([`policy`]);
//! 5. the body is read, within the gateway-wide budget of buffered bytes, and the team's quotas
//!    admit it ([`quota`]);
//! 6. query and body are checked against the spec's schemas ([`validate`]);
//! 7. it is forwarded with the team's upstream credential ([`auth::upstream`], [`proxy`]);
//! 8. every request ends in one tamper-evident audit record ([`audit`]).
//!
//! Every error a client can see is a [`error::GatewayError`], rendered in one place.

pub mod admin;
pub mod audit;
pub mod auth;
pub mod cli;
pub mod config;
pub mod dev;
pub mod error;
pub mod gateway;
pub mod healthcheck;
pub mod http_client;
pub mod memory;
pub mod metrics;
pub mod pipeline;
pub mod policy;
pub mod proxy;
pub mod quota;
pub mod reload;
pub mod sandbox;
pub mod server;
pub mod service;
pub mod spec;
pub mod telemetry;
pub mod validate;
pub mod values;
