//! streamrec's benchmark tool. It generates a seeded, Amazon-shaped profile workload, preloads
//! it into a fresh topic, and measures on that same topic the raw rate at which Kafka consumers
//! read it and the end-to-end rate of the real `dataflow` binary, from first read to the last
//! Redis acknowledgement, with the ratio between them.

pub mod broker;
pub mod e2e;
pub mod memory;
pub mod paced;
pub mod workload;
