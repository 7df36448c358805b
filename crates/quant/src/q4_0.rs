//! q4_0 blocks. (Placeholder body: being implemented.)
/// Dequantizes whole blocks; lengths are checked by the caller.
pub fn dequantize_row(_src: &[u8], _dst: &mut [f32]) { todo!() }
