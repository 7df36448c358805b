//! F32, F16 and BF16 storage. (Placeholder bodies: being implemented.)
pub fn dequantize_row_f32(_src: &[u8], _dst: &mut [f32]) { todo!() }
pub fn dequantize_row_f16(_src: &[u8], _dst: &mut [f32]) { todo!() }
pub fn dequantize_row_bf16(_src: &[u8], _dst: &mut [f32]) { todo!() }
