//! The dataflow binary.
fn main() {}
