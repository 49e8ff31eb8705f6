//! Results files: records as JSON lines (`JOB/results/TASK_ID.jsonl`) and back.

use quire_core::Record;

/// Serialises records as JSON lines, in page order.
pub fn to_jsonl(records: &[Record]) -> Vec<u8> {
    let mut out = Vec::new();
    for r in records {
        serde_json::to_writer(&mut out, r).expect("records serialise");
        out.push(b'\n');
    }
    out
}

/// Reads a results file back: one record per non-blank line.
pub fn parse_jsonl(bytes: &[u8]) -> anyhow::Result<Vec<Record>> {
    bytes
        .split(|b| *b == b'\n')
        .filter(|l| !l.iter().all(u8::is_ascii_whitespace))
        .map(|l| Ok(serde_json::from_slice(l)?))
        .collect()
}
