//! Recommendations (semantics §8): item-to-item co-visitation over the newest part of every
//! user's history, each item's strongest neighbours, and per-user top-N lists filled up with the
//! most popular items. [`reference`] is the plain sequential definition, which the dataflow's
//! incremental version is tested against and which the evaluation command (`bench-recs`) runs.

pub mod covisit;
pub mod reference;
pub mod scores;
