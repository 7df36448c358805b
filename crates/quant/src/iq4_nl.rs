//! IQ4_NL blocks. (Placeholder body: being implemented.)

/// The non-linear 4-bit codebook shared by IQ4_NL and IQ4_XS.
pub const KVALUES_IQ4NL: [i8; 16] = [-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113];

/// Dequantizes whole blocks; lengths are checked by the caller.
pub fn dequantize_row(_src: &[u8], _dst: &mut [f32]) { todo!() }
