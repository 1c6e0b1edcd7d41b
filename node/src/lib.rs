//! The edgevec node: configuration, certificates, QUIC transport, the
//! request service, and the `edgevec` command line.
//!
//! Layering (dependencies point down):
//! `cli` → `node` (wiring) → `service` → `router` → `replication`,
//! `health` → `meta` → `net` → `edgevec_meta` / `edgevec_engine` /
//! `edgevec_proto`; `admin` serves HTTP beside the QUIC endpoint.
//! Decision logic (authorisation, validation) is plain functions over plain
//! data; quinn, redb and the file system stay at the edges.

pub mod admin;
pub mod certs;
pub mod cli;
pub mod config;
pub mod deploy;
pub mod faults;
pub mod health;
pub mod meta;
pub mod metrics;
pub mod net;
pub mod node;
pub mod policy;
pub mod replication;
pub mod router;
pub mod service;
pub mod status;
