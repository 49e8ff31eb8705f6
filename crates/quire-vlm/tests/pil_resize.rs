//! Byte equality of `pil::resize` with Pillow's `Image.resize` on random size pairs
//! (up- and downscaling per axis, both pass orders and their boundary), LANCZOS and BICUBIC.
//! Reference: `tests/fixtures/idefics3/pil_resize.bin`, written by `tests/gen_pil_resize.py`.

use std::path::Path;

use image::RgbImage;
use quire_vlm::pil::{self, Resample};

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> &'a [u8] {
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        a
    }
    fn u16(&mut self) -> usize {
        u16::from_le_bytes(self.take(2).try_into().unwrap()) as usize
    }
    fn u32(&mut self) -> usize {
        u32::from_le_bytes(self.take(4).try_into().unwrap()) as usize
    }
}

#[test]
fn resize_matches_pillow_bytes() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/idefics3/pil_resize.bin");
    let data = std::fs::read(&path).unwrap();
    let mut r = Reader(&data);
    assert_eq!(r.take(8), b"PILRSZ1\0");
    let version = (r.u32(), r.u32(), r.u32());
    let sources = r.u32();
    let (mut checked, mut vfirst, mut failures) = (0, 0, Vec::new());
    for _ in 0..sources {
        let (w, h) = (r.u16(), r.u16());
        let src = RgbImage::from_raw(w as u32, h as u32, r.take(w * h * 3).to_vec()).unwrap();
        for _ in 0..r.u16() {
            let (ow, oh) = (r.u16(), r.u16());
            let filter = Resample::from_pil(r.take(1)[0] as i64);
            let want = r.take(ow * oh * 3);
            let got = pil::resize(&src, ow as u32, oh as u32, filter);
            assert_eq!(got.dimensions(), (ow as u32, oh as u32));
            let bad = got.as_raw().iter().zip(want).filter(|(a, b)| a != b).count();
            if bad > 0 {
                failures.push(format!("{w}x{h} -> {ow}x{oh} {filter:?}: {bad} bytes differ"));
            }
            checked += 1;
            vfirst += (ow != w && pil::vertical_first(w, h, ow, oh)) as usize;
        }
    }
    assert!(r.0.is_empty(), "trailing bytes in {}", path.display());
    assert!(checked > 300 && vfirst > 50, "fixture too small: {checked} cases, {vfirst} vertical-first");
    assert!(
        failures.is_empty(),
        "{} of {checked} resizes differ from Pillow {version:?}:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
