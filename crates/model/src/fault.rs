//! Deliberate bugs, injected on request to test that `kiln diff` finds the first wrong operation.
//! Each reproduces a mistake seen in real GGUF engines, as an edit of the model — its description
//! or one weight — that the ordinary forward pass then runs: no fault is a branch in the pass.

use std::fmt;
use std::str::FromStr;

use kiln_gguf::GgmlType;
use kiln_quant::matmul::QMatrix;

use crate::arch::RopePairing;
use crate::ModelWeights;

#[doc(hidden)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// RoPE rotates the other pairs (halves instead of adjacent pairs, or the reverse): first
    /// wrong at `q_rope-0`.
    RopePairing,
    /// The LM head is read as if stored `[n_embd, n_vocab]`: first wrong at `logits`.
    TransposedLmHead,
    /// RMSNorm without its epsilon: first wrong at `attn_norm-0`.
    NoRmsEps,
    /// Layer 0's q projection runs on f16 copies of its weights: first wrong at `q-0`.
    F16Matmul,
}

impl Fault {
    pub const ALL: [Fault; 4] = [Fault::RopePairing, Fault::TransposedLmHead, Fault::NoRmsEps, Fault::F16Matmul];

    pub fn name(self) -> &'static str {
        match self {
            Fault::RopePairing => "rope-pairing",
            Fault::TransposedLmHead => "transposed-lm-head",
            Fault::NoRmsEps => "no-rms-eps",
            Fault::F16Matmul => "f16-matmul",
        }
    }
}

impl Fault {
    /// The model with this fault: `w` with its description or one weight edited. Edited weights
    /// live in `storage`.
    pub fn apply<'s>(self, w: &ModelWeights<'s>, storage: &'s mut Vec<u8>) -> ModelWeights<'s> {
        let mut faulty = w.clone();
        let cfg = &mut faulty.cfg;
        match self {
            Fault::RopePairing => {
                cfg.rope_pairing = match cfg.rope_pairing {
                    RopePairing::Adjacent => RopePairing::Halves,
                    RopePairing::Halves => RopePairing::Adjacent,
                }
            }
            Fault::NoRmsEps => cfg.rms_eps = 0.0,
            Fault::TransposedLmHead => {
                // The head's values in memory order, re-read with rows and columns swapped.
                let m = &w.output;
                let (nv, e) = (m.rows, m.cols);
                let mut flat = vec![0f32; nv * e];
                for (r, row) in flat.chunks_exact_mut(e).enumerate() {
                    m.dequantize_row_into(r, row);
                }
                storage.clear();
                for v in 0..nv {
                    for i in 0..e {
                        storage.extend_from_slice(&flat[i * nv + v].to_le_bytes());
                    }
                }
                let bytes: &'s [u8] = storage;
                faulty.output = QMatrix::new(GgmlType::F32, bytes, nv, e).expect("an F32 matrix of the head's shape");
            }
            Fault::F16Matmul => {
                let m = &w.layers[0].wq;
                let mut row = vec![0f32; m.cols];
                storage.clear();
                for r in 0..m.rows {
                    m.dequantize_row_into(r, &mut row);
                    for &v in &row {
                        storage.extend_from_slice(&half::f16::from_f32(v).to_le_bytes());
                    }
                }
                let bytes: &'s [u8] = storage;
                faulty.layers[0].wq =
                    QMatrix::new(GgmlType::F16, bytes, m.rows, m.cols).expect("an F16 matrix of q's shape");
            }
        }
        faulty
    }
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Fault {
    type Err = String;

    fn from_str(s: &str) -> Result<Fault, String> {
        Fault::ALL.into_iter().find(|f| f.name() == s).ok_or_else(|| {
            let names: Vec<&str> = Fault::ALL.iter().map(|f| f.name()).collect();
            format!("unknown fault '{s}' (one of: {})", names.join(", "))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for f in Fault::ALL {
            assert_eq!(f.name().parse::<Fault>(), Ok(f));
        }
        assert!("rope".parse::<Fault>().unwrap_err().contains("rope-pairing"));
    }
}
