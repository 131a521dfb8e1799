//! SSE benchmark (being written).
fn main() {}
