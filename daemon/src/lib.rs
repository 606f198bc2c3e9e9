//! denokv: a self-hosted Deno KV server speaking the KV Connect protocol.

pub mod kv;
pub mod store;

/// The KV Connect protobuf messages (SPEC §2.2), generated from `proto/datapath.proto`.
pub mod proto {
    #![allow(clippy::all)]
    include!(concat!(env!("OUT_DIR"), "/com.deno.kv.datapath.rs"));
}
