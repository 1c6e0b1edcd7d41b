//! The edgevec node: configuration, certificates, QUIC transport, the
//! request service, and the `edgevec` command line.
//!
//! Layering (dependencies point down):
//! `cli` → `node` (wiring) → `service` → `net` → `edgevec_engine` / `edgevec_proto`.
//! Decision logic (authorisation, validation) is plain functions over plain
//! data; quinn, redb and the file system stay at the edges.

pub mod certs;
pub mod cli;
pub mod config;
pub mod net;
pub mod node;
pub mod service;
