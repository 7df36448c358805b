//! Deliberate bugs, injected on request to test that `kiln diff` finds the first wrong operation.
//! Each reproduces a mistake seen in real GGUF engines.

use std::fmt;
use std::str::FromStr;

#[doc(hidden)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// RoPE rotates (x[i], x[i + n_rot/2]) instead of adjacent pairs: first wrong at `q_rope-0`.
    RopePairing,
    /// The LM head is read as if stored `[n_embd, n_vocab]`: first wrong at `logits`.
    TransposedLmHead,
    /// RMSNorm without its epsilon: first wrong at `attn_norm-0`.
    NoRmsEps,
    /// Layer 0's q projection input is rounded through f16: first wrong at `q-0`.
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
