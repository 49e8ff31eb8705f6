//! Any bytes as DocTags: parsing and rendering never panic, boxes stay on
//! the page, table grids are rectangular.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    for page in quire_doctags::split_pages(&text) {
        let blocks = quire_doctags::parse_page(page, 640, 480);
        for b in &blocks {
            if let Some([x0, y0, x1, y1]) = b.bbox {
                assert!([x0, x1].iter().all(|v| (0.0..=640.0).contains(v)));
                assert!([y0, y1].iter().all(|v| (0.0..=480.0).contains(v)));
            }
            if let Some(t) = &b.table {
                let g = t.grid();
                assert_eq!(g.len(), t.rows as usize);
                assert!(g.iter().all(|r| r.len() == t.cols as usize));
            }
        }
        quire_doctags::markdown(&blocks);
    }
});
