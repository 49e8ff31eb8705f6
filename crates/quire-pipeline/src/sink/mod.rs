//! What a job leaves under its output besides the records: [`jsonl`] (the results files),
//! [`finish`] (per-document Markdown and `manifest.json` once every task is settled) and
//! [`datasets`] (Parquet and WebDataset caption shards at the finish), and [`store`]
//! (opening the output, a folder or `s3://`). May import `stage::plan`; never `worker` or
//! `coordinator`.

pub mod datasets;
pub mod finish;
pub mod jsonl;
pub mod store;
#[cfg(test)]
mod tests;
