//! Finding the first wrong operation: activation capture and dumps, run-against-run comparison
//! (`kiln diff`), and perplexity / KL divergence over text (`kiln perplexity`).

pub mod capture;
pub mod diff;
pub mod dumpdir;
pub mod names;
pub mod npy;
pub mod ppl;

pub use capture::{capture, Filter, Tensor};
pub use diff::{DiffReport, Thresholds, THRESHOLDS};
