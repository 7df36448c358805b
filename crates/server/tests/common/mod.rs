//! Helpers every server test binary uses (each `tests/*.rs` is its own crate: `mod common;`).
#![allow(dead_code)]

use std::path::Path;
use std::sync::Arc;

use kiln_engine::Model;

pub fn load(path: &Path) -> Arc<Model> {
    Arc::new(Model::load(path).expect("model loads"))
}

/// The body of a `Transfer-Encoding: chunked` response, put back together.
pub fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).expect("chunk size");
        if n == 0 {
            break;
        }
        out.push_str(&rest[..n]);
        s = &rest[n + 2..];
    }
    out
}
