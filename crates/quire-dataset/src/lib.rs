//! Caption datasets made from quire records: a Parquet file (one row per record) and a
//! WebDataset caption shard (`KEY.txt` and `KEY.json` per sample).
//!
//! Both writers are pure: records in, bytes out, no I/O and no clock. The same records
//! always give the same bytes (no timestamps; tar members have mtime 0, uid/gid 0, mode
//! 0644; gzip has no name and mtime 0), so rerunning a job's finish rewrites nothing that
//! did not change. Heavy dependencies (arrow, parquet) live only in this crate.
//!
//! # Parquet schema
//!
//! One row per record, in the order given. Columns (see [`parquet_schema`]):
//!
//! | column | type | from the record |
//! |---|---|---|
//! | `key` | string, null | `key` (WebDataset key of an archive member) |
//! | `source` | string | `source` (the archive, or the image file) |
//! | `member` | string, null | `member` (path in the archive) |
//! | `page` | int32 | `page` (frame of a multi-frame image, else 1) |
//! | `caption` | string | `text` |
//! | `status` | string | `ok`; `loop` when the model's output looped and was stopped (`error.kind` `loop`, caption kept up to one repetition); `error` for any other `error` |
//! | `error_kind` | string, null | `error.kind` |
//! | `error_message` | string, null | `error.message` |
//! | `model` | string, null | `model` |
//! | `prompt` | string, null | `prompt` |
//! | `tokens_in` | int64 | `tokens_in` |
//! | `tokens_out` | int64 | `tokens_out` |
//! | `width` | int32 | `width` |
//! | `height` | int32 | `height` |
//! | `finish_reason` | string | `finish_reason` (`stop`, `length`, `loop`, `error`) |
//! | `task_id` | string | `task_id` |
//!
//! Columns are zstd-compressed; the file's key-value metadata holds what the caller passes
//! (quire's finish stores `quire.job` and `quire.digest` there).

use arrow_array::builder::{Int32Builder, Int64Builder, StringBuilder};
use arrow_array::{ArrayRef, RecordBatch};
use arrow_schema::{DataType, Field, Schema, SchemaRef};
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::metadata::KeyValue;
use parquet::file::properties::WriterProperties;
use quire_core::{FinishReason, Record};
use std::io::Write;
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum DatasetError {
    #[error("writing Parquet: {0}")]
    Parquet(#[from] parquet::errors::ParquetError),
    #[error("building Arrow arrays: {0}")]
    Arrow(#[from] arrow_schema::ArrowError),
    #[error("writing a tar: {0}")]
    Io(#[from] std::io::Error),
    #[error("encoding a record as JSON: {0}")]
    Json(#[from] serde_json::Error),
}

/// Rows per Arrow batch (and so the most rows held as Arrow arrays at once).
pub const BATCH_ROWS: usize = 8192;

/// The Parquet columns, in order (see the crate documentation).
pub fn parquet_schema() -> SchemaRef {
    let s = |name: &str, nullable| Field::new(name, DataType::Utf8, nullable);
    Arc::new(Schema::new(vec![
        s("key", true),
        s("source", false),
        s("member", true),
        Field::new("page", DataType::Int32, false),
        s("caption", false),
        s("status", false),
        s("error_kind", true),
        s("error_message", true),
        s("model", true),
        s("prompt", true),
        Field::new("tokens_in", DataType::Int64, false),
        Field::new("tokens_out", DataType::Int64, false),
        Field::new("width", DataType::Int32, false),
        Field::new("height", DataType::Int32, false),
        s("finish_reason", false),
        s("task_id", false),
    ]))
}

fn finish_reason(f: FinishReason) -> &'static str {
    match f {
        FinishReason::Stop => "stop",
        FinishReason::Length => "length",
        FinishReason::Loop => "loop",
        FinishReason::Error => "error",
    }
}

fn clamp_i32(v: u32) -> i32 {
    i32::try_from(v).unwrap_or(i32::MAX)
}

fn clamp_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn batch(schema: &SchemaRef, records: &[&Record]) -> Result<RecordBatch, DatasetError> {
    let n = records.len();
    let strings = || StringBuilder::with_capacity(n, n * 16);
    let (mut key, mut source, mut member, mut caption, mut status) = (strings(), strings(), strings(), strings(), strings());
    let (mut error_kind, mut error_message, mut model, mut prompt) = (strings(), strings(), strings(), strings());
    let (mut finish, mut task_id) = (strings(), strings());
    let (mut page, mut width, mut height) = (Int32Builder::with_capacity(n), Int32Builder::with_capacity(n), Int32Builder::with_capacity(n));
    let (mut tokens_in, mut tokens_out) = (Int64Builder::with_capacity(n), Int64Builder::with_capacity(n));
    for r in records {
        key.append_option(r.key.as_deref());
        source.append_value(&r.source);
        member.append_option(r.member.as_deref());
        page.append_value(clamp_i32(r.page));
        caption.append_value(&r.text);
        status.append_value(if r.failed() { "error" } else if r.looped() { "loop" } else { "ok" });
        error_kind.append_option(r.error.as_ref().map(|e| e.kind.as_str()));
        error_message.append_option(r.error.as_ref().map(|e| e.message.as_str()));
        model.append_option(r.model.as_deref());
        prompt.append_option(r.prompt.as_deref());
        tokens_in.append_value(clamp_i64(r.tokens_in));
        tokens_out.append_value(clamp_i64(r.tokens_out));
        width.append_value(clamp_i32(r.width));
        height.append_value(clamp_i32(r.height));
        finish.append_value(finish_reason(r.finish_reason));
        task_id.append_value(&r.task_id);
    }
    let columns: Vec<ArrayRef> = vec![
        Arc::new(key.finish()),
        Arc::new(source.finish()),
        Arc::new(member.finish()),
        Arc::new(page.finish()),
        Arc::new(caption.finish()),
        Arc::new(status.finish()),
        Arc::new(error_kind.finish()),
        Arc::new(error_message.finish()),
        Arc::new(model.finish()),
        Arc::new(prompt.finish()),
        Arc::new(tokens_in.finish()),
        Arc::new(tokens_out.finish()),
        Arc::new(width.finish()),
        Arc::new(height.finish()),
        Arc::new(finish.finish()),
        Arc::new(task_id.finish()),
    ];
    Ok(RecordBatch::try_new(schema.clone(), columns)?)
}

/// The Parquet file of `records` (one row each, in order), zstd-compressed, with
/// `metadata` as the file's key-value metadata.
pub fn write_parquet(records: &[&Record], metadata: &[(&str, &str)]) -> Result<Vec<u8>, DatasetError> {
    let schema = parquet_schema();
    let kv = metadata.iter().map(|(k, v)| KeyValue::new(k.to_string(), v.to_string())).collect();
    let props = WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::default()))
        .set_key_value_metadata(Some(kv))
        .build();
    let mut out = Vec::new();
    let mut w = ArrowWriter::try_new(&mut out, schema.clone(), Some(props))?;
    for chunk in records.chunks(BATCH_ROWS) {
        w.write(&batch(&schema, chunk)?)?;
    }
    w.close()?;
    Ok(out)
}

/// Whether `key` can name a WebDataset sample: not empty, relative, no `.` or `..`
/// component, no NUL or other control character, and no dot in its base name (a reader
/// takes everything after the base name's first dot as the extension).
pub fn is_sample_key(key: &str) -> bool {
    if key.is_empty() || key.starts_with('/') || key.contains('\\') || key.chars().any(char::is_control) {
        return false;
    }
    let parts: Vec<&str> = key.split('/').collect();
    if parts.iter().any(|p| p.is_empty() || *p == "." || *p == "..") {
        return false;
    }
    !parts.last().is_some_and(|base| base.contains('.'))
}

/// What went into a caption shard.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ShardCounts {
    /// Samples written (`KEY.txt` + `KEY.json` each).
    pub samples: u64,
    /// Records left out: no key (a record for a whole archive, such as a truncated or
    /// empty one) or a key that cannot name a sample (see [`is_sample_key`]).
    pub skipped: u64,
}

fn append(tar: &mut tar::Builder<impl Write>, path: &str, data: &[u8]) -> std::io::Result<()> {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Regular);
    h.set_size(data.len() as u64);
    h.set_mode(0o644);
    h.set_mtime(0);
    h.set_uid(0);
    h.set_gid(0);
    tar.append_data(&mut h, path, data)
}

/// The WebDataset caption shard of `records`: for each record with a usable key, in
/// order, `KEY.txt` (the caption; empty for an error record) then `KEY.json` (the whole
/// record). Gzip-compressed when `gzip` is set. Images are not copied: a reader zips this
/// shard with the input shard by key.
pub fn write_webdataset(records: &[&Record], gzip: bool) -> Result<(Vec<u8>, ShardCounts), DatasetError> {
    let mut counts = ShardCounts::default();
    let mut tar = tar::Builder::new(Vec::new());
    for r in records {
        let Some(key) = r.key.as_deref().filter(|k| is_sample_key(k)) else {
            counts.skipped += 1;
            continue;
        };
        let caption: &str = if r.failed() { "" } else { &r.text };
        append(&mut tar, &format!("{key}.txt"), caption.as_bytes())?;
        append(&mut tar, &format!("{key}.json"), &serde_json::to_vec(r)?)?;
        counts.samples += 1;
    }
    let bytes = tar.into_inner()?;
    if !gzip {
        return Ok((bytes, counts));
    }
    let mut gz = flate2::GzBuilder::new().mtime(0).write(Vec::new(), flate2::Compression::default());
    gz.write_all(&bytes)?;
    Ok((gz.finish()?, counts))
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow_array::{Array, Int32Array, Int64Array, StringArray};
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
    use quire_core::{ErrorInfo, ErrorKind, Timings};
    use std::io::Read;

    pub(crate) fn record(i: u32, error: bool) -> Record {
        Record {
            job: "j".into(),
            task_id: format!("t{}", i / 3),
            source: "in/shard-000000.tar".into(),
            page: 1,
            page_count: 1,
            task: "caption".into(),
            engine: "vlm".into(),
            model: Some("m".into()),
            prompt: Some("Describe the image.".into()),
            text: if error { String::new() } else { format!("caption {i}, with \"quotes\" and ünïcode") },
            tokens_in: 100 + u64::from(i),
            tokens_out: if error { 0 } else { 7 },
            finish_reason: if error { FinishReason::Error } else { FinishReason::Stop },
            width: 32 + i,
            height: 24,
            timings_ms: Timings::default(),
            error: error.then(|| ErrorInfo { kind: ErrorKind::Corrupt, message: format!("sample {i} is damaged") }),
            key: Some(format!("{i:09}")),
            member: Some(format!("{i:09}.jpg")),
            markdown: None,
            blocks: None,
            loop_info: None,
        }
    }

    fn strings(b: &RecordBatch, name: &str) -> Vec<Option<String>> {
        let a = b.column_by_name(name).unwrap().as_any().downcast_ref::<StringArray>().unwrap();
        (0..a.len()).map(|i| a.is_valid(i).then(|| a.value(i).to_string())).collect()
    }

    #[test]
    fn parquet_rows_are_the_records_in_order_and_the_bytes_are_stable() {
        let recs: Vec<Record> = (0..20_000).map(|i| record(i, i % 7 == 3)).collect();
        let refs: Vec<&Record> = recs.iter().collect();
        let bytes = write_parquet(&refs, &[("quire.digest", "abc")]).unwrap();
        assert_eq!(bytes, write_parquet(&refs, &[("quire.digest", "abc")]).unwrap(), "same records, same bytes");
        let builder = ParquetRecordBatchReaderBuilder::try_new(bytes::Bytes::from(bytes.clone())).unwrap();
        let meta = builder.metadata().clone();
        let kv = meta.file_metadata().key_value_metadata().unwrap();
        assert!(kv.iter().any(|k| k.key == "quire.digest" && k.value.as_deref() == Some("abc")));
        for rg in meta.row_groups() {
            for c in rg.columns() {
                assert!(matches!(c.compression(), Compression::ZSTD(_)), "{:?}", c.compression());
            }
        }
        let batches: Vec<RecordBatch> = builder.build().unwrap().map(Result::unwrap).collect();
        let mut row = 0usize;
        for b in &batches {
            let keys = strings(b, "key");
            let captions = strings(b, "caption");
            let status = strings(b, "status");
            let kinds = strings(b, "error_kind");
            let messages = strings(b, "error_message");
            let members = strings(b, "member");
            let tin = b.column_by_name("tokens_in").unwrap().as_any().downcast_ref::<Int64Array>().unwrap();
            let w = b.column_by_name("width").unwrap().as_any().downcast_ref::<Int32Array>().unwrap();
            for i in 0..b.num_rows() {
                let r = &recs[row];
                assert_eq!(keys[i], r.key);
                assert_eq!(members[i], r.member);
                assert_eq!(captions[i].as_deref(), Some(r.text.as_str()));
                assert_eq!(status[i].as_deref(), Some(if r.error.is_some() { "error" } else { "ok" }));
                assert_eq!(kinds[i].as_deref(), r.error.as_ref().map(|e| e.kind.as_str()));
                assert_eq!(messages[i], r.error.as_ref().map(|e| e.message.clone()));
                assert_eq!(tin.value(i) as u64, r.tokens_in);
                assert_eq!(w.value(i) as u32, r.width);
                row += 1;
            }
        }
        assert_eq!(row, recs.len());
        let empty = write_parquet(&[], &[]).unwrap();
        let b = ParquetRecordBatchReaderBuilder::try_new(bytes::Bytes::from(empty)).unwrap();
        assert_eq!(b.schema().fields().len(), parquet_schema().fields().len(), "an empty file still has the columns");
    }

    #[test]
    fn sample_keys_that_could_escape_or_split_are_refused() {
        for ok in ["000000123", "dir/000123", "a b/c", "été"] {
            assert!(is_sample_key(ok), "{ok}");
        }
        for bad in ["", "/abs/x", "../x", "a/../b", "a/./b", "a//b", "a.b", "dir/x.y", "nul\0", "a\\b", "line\nbreak"] {
            assert!(!is_sample_key(bad), "{bad:?}");
        }
    }

    #[test]
    fn caption_shard_has_txt_and_json_per_sample_in_order() {
        let mut recs: Vec<Record> = (0..5).map(|i| record(i, i == 2)).collect();
        let mut whole = record(99, true);
        whole.key = None;
        whole.member = None;
        recs.push(whole);
        let mut hostile = record(98, false);
        hostile.key = Some("../../etc/passwd".into());
        recs.push(hostile);
        let refs: Vec<&Record> = recs.iter().collect();
        let (plain, counts) = write_webdataset(&refs, false).unwrap();
        assert_eq!(counts, ShardCounts { samples: 5, skipped: 2 });
        assert_eq!(plain, write_webdataset(&refs, false).unwrap().0, "same records, same bytes");
        let mut ar = tar::Archive::new(plain.as_slice());
        let mut seen = Vec::new();
        for e in ar.entries().unwrap() {
            let mut e = e.unwrap();
            assert_eq!((e.header().mtime().unwrap(), e.header().mode().unwrap()), (0, 0o644));
            let name = e.path().unwrap().to_string_lossy().to_string();
            let mut body = String::new();
            e.read_to_string(&mut body).unwrap();
            seen.push((name, body));
        }
        let names: Vec<&str> = seen.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            ["000000000.txt", "000000000.json", "000000001.txt", "000000001.json", "000000002.txt", "000000002.json", "000000003.txt", "000000003.json", "000000004.txt", "000000004.json"]
        );
        assert_eq!(seen[2].1, recs[1].text);
        assert_eq!(seen[4].1, "", "an error record's caption is empty");
        let back: Record = serde_json::from_str(&seen[5].1).unwrap();
        assert_eq!(back, recs[2], "the JSON is the whole record");
        let (gz, _) = write_webdataset(&refs, true).unwrap();
        let mut unzipped = Vec::new();
        flate2::read::GzDecoder::new(gz.as_slice()).read_to_end(&mut unzipped).unwrap();
        assert_eq!(unzipped, plain);
        assert_eq!(gz, write_webdataset(&refs, true).unwrap().0);
    }
}
