//! The streamrec dataflow: reads profile messages from Kafka in epochs, keeps every user's
//! profile and interest vector up to date incrementally, and writes exactly the changed profiles
//! to Redis once each epoch is complete.
//!
//! [`graph`] builds the whole dataflow in one function: [`upsert`] turns messages into the
//! current values of differential arrangements (latest wins), [`state`] holds the profile and
//! features arrangements and the hand-made tables beside them, [`interest`] reads the
//! arrangements and emits each changed user's value, and [`output`] turns complete epochs into
//! final values for a writer. [`in_memory`] drives the same core from memory and
//! [`reference`](mod@reference) is the plain sequential contract it is tested against.
//! [`recommend`] holds the recommendations' sequential reference (semantics §8).
//! [`source`] reads Kafka, [`epoch`] maps offsets to epochs, [`replay`] rebuilds the state on
//! start, [`catch_up`] says when values may be written without the no-regression check, and
//! [`run`] is the worker loop around them all; [`metrics`] serves what it counts to Prometheus.
//! [`checkpoint`] writes each worker's state as of a durable time and restores the newest
//! complete checkpoint on start, so that a restart replays only what came after it.

pub mod catch_up;
pub mod checkpoint;
pub mod config;
pub mod epoch;
pub mod features;
pub mod graph;
pub mod in_memory;
pub mod interest;
mod key_index;
pub mod metrics;
pub mod model;
pub mod output;
mod pending;
pub mod recommend;
pub mod reference;
pub mod replay;
pub mod run;
pub mod source;
pub mod state;
pub mod stats;
pub mod upsert;
