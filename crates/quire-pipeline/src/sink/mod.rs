//! What a job leaves under its output besides the records: [`jsonl`] (the results files),
//! [`finish`] (per-document Markdown and `manifest.json` once every task is settled) and
//! [`datasets`] (Parquet and WebDataset caption shards at the finish). The output itself is
//! opened by `quire_store::open_store`. May import `stage::plan`; never `worker` or
//! `coordinator`.

pub mod datasets;
pub mod finish;
pub mod jsonl;
#[cfg(test)]
mod tests;
