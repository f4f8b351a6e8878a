//! `#[pg_test]`s: the SQL surface inside the pgrx test cluster (preloaded, worker running).
