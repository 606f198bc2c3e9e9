//! denokv: a self-hosted Deno KV server speaking the KV Connect protocol.

pub mod backup;
pub mod config;
pub mod fatal;
pub mod health;
pub mod http;
pub mod kv;
pub mod metrics;
pub mod runtime;
pub mod store;
pub mod systemd;
pub mod telemetry;
pub mod traces;

/// The KV Connect protobuf messages (SPEC §2.2), generated from `proto/datapath.proto`.
pub mod proto {
    #![allow(clippy::all)]
    include!(concat!(env!("OUT_DIR"), "/com.deno.kv.datapath.rs"));
}

/// The S3 backup protobuf messages (SPEC §8.2), generated from `proto/backup.proto`.
pub mod backup_proto {
    #![allow(clippy::all)]
    include!(concat!(env!("OUT_DIR"), "/com.deno.kv.backup.rs"));
}
