//! NumPy `.npy` files: a writer for 2-D little-endian f32 arrays (format 1.0) and a reader for the
//! C-ordered float arrays another engine's dump converter is likely to write (`<f4`, `<f8`; format
//! 1.0–3.0). The format is a magic string, a Python-dict header and the raw data; small enough
//! that a dependency would buy nothing.

use std::io::Write;
use std::path::Path;

use anyhow::{bail, Context, Result};

const MAGIC: &[u8] = b"\x93NUMPY";

/// Writes `data` as a C-ordered `<f4` array of shape `(rows, cols)`.
pub fn write_f32(path: &Path, rows: usize, cols: usize, data: &[f32]) -> Result<()> {
    write_f32_shape(path, &[rows, cols], data)
}

/// Writes `data` as a C-ordered `<f4` array of any shape.
pub fn write_f32_shape(path: &Path, shape: &[usize], data: &[f32]) -> Result<()> {
    assert_eq!(data.len(), shape.iter().product::<usize>(), "npy data does not match its shape");
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    // Python's repr of a 1-tuple has a trailing comma.
    let tuple = if dims.len() == 1 { format!("({},)", dims[0]) } else { format!("({})", dims.join(", ")) };
    let mut dict = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {tuple}, }}");
    // Magic (6) + version (2) + length (2) + dict + '\n' is padded to a multiple of 64.
    let unpadded = MAGIC.len() + 4 + dict.len() + 1;
    dict.push_str(&" ".repeat(unpadded.next_multiple_of(64) - unpadded));
    dict.push('\n');
    let mut bytes = Vec::with_capacity(10 + dict.len() + data.len() * 4);
    bytes.extend_from_slice(MAGIC);
    bytes.extend_from_slice(&[1, 0]);
    bytes.extend_from_slice(&(dict.len() as u16).to_le_bytes());
    bytes.extend_from_slice(dict.as_bytes());
    for v in data {
        bytes.extend_from_slice(&v.to_le_bytes());
    }
    let mut f = std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    f.write_all(&bytes).with_context(|| format!("writing {}", path.display()))
}

/// An array read from a `.npy` file: its shape and its values as f32, C order.
#[derive(Debug)]
pub struct Array {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

pub fn read(path: &Path) -> Result<Array> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    parse(&bytes).with_context(|| format!("{}", path.display()))
}

pub fn parse(bytes: &[u8]) -> Result<Array> {
    if bytes.len() < 10 || &bytes[..6] != MAGIC {
        bail!("not a .npy file (no \\x93NUMPY magic)");
    }
    let (header_len, start) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 if bytes.len() >= 12 => (u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize, 12),
        v => bail!(".npy format version {v} is not supported"),
    };
    let Some(header) = bytes.get(start..start + header_len) else {
        bail!("truncated .npy header");
    };
    let header = std::str::from_utf8(header).context(".npy header is not text")?;
    let descr = dict_value(header, "descr").context(".npy header has no 'descr'")?;
    // The value is a quoted string: 'descr': '<f4', …
    let descr = descr
        .strip_prefix(['\'', '"'])
        .and_then(|rest| rest.split(['\'', '"']).next())
        .context("malformed 'descr' in .npy header")?;
    if dict_value(header, "fortran_order").is_some_and(|v| v.starts_with("True")) {
        bail!("Fortran-ordered arrays are not supported (save with C order)");
    }
    let shape_text = dict_value(header, "shape").context(".npy header has no 'shape'")?;
    let inner = shape_text.trim_start_matches('(');
    let inner = &inner[..inner.find(')').context("malformed 'shape' in .npy header")?];
    let shape: Vec<usize> = inner
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse::<usize>().with_context(|| format!("malformed dimension {s:?} in .npy shape")))
        .collect::<Result<_>>()?;
    let n: usize = shape.iter().product();
    let payload = &bytes[start + header_len..];
    let width = match descr {
        "<f4" | "|f4" => 4,
        "<f8" | "|f8" => 8,
        other => bail!("element type {other:?} is not supported (little-endian f32 '<f4' or f64 '<f8')"),
    };
    if payload.len() != n * width {
        bail!("shape {shape:?} needs {} bytes of data, the file holds {}", n * width, payload.len());
    }
    let data = if width == 4 {
        payload.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
    } else {
        payload.chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")) as f32).collect()
    };
    Ok(Array { shape, data })
}

/// The text after `'key':` in a Python dict literal, up to the end of the header.
fn dict_value<'h>(header: &'h str, key: &str) -> Option<&'h str> {
    for quote in ['\'', '"'] {
        let pat = format!("{quote}{key}{quote}");
        if let Some(i) = header.find(&pat) {
            let rest = header[i + pat.len()..].trim_start();
            return Some(rest.strip_prefix(':')?.trim_start());
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_alignment() {
        let dir = std::env::temp_dir().join(format!("kiln-npy-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("a.npy");
        let data: Vec<f32> = (0..6).map(|i| i as f32 * 0.5 - 1.0).collect();
        write_f32(&p, 2, 3, &data).unwrap();
        let bytes = std::fs::read(&p).unwrap();
        let header_len = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
        assert_eq!((10 + header_len) % 64, 0);
        assert_eq!(bytes[10 + header_len - 1], b'\n');
        let a = read(&p).unwrap();
        assert_eq!(a.shape, vec![2, 3]);
        assert_eq!(a.data, data);
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn reads_f64_and_3d() {
        let dict = "{'descr': '<f8', 'fortran_order': False, 'shape': (1, 2, 1), }\n";
        let mut b = Vec::from(MAGIC);
        b.extend_from_slice(&[1, 0]);
        b.extend_from_slice(&(dict.len() as u16).to_le_bytes());
        b.extend_from_slice(dict.as_bytes());
        for v in [1.5f64, -2.0] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        let a = parse(&b).unwrap();
        assert_eq!(a.shape, vec![1, 2, 1]);
        assert_eq!(a.data, vec![1.5, -2.0]);
        b.pop();
        assert!(parse(&b).unwrap_err().to_string().contains("needs 16 bytes"));
        assert!(parse(b"hello world").is_err());
    }
}
