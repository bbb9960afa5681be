//! TensorBoard event files: what training reports (the loss every few steps, the learning rate,
//! throughput, each epoch's validation figures, the config) as the `events.out.tfevents.*`
//! files `tensorboard --logdir` reads. Each record is a length, its masked CRC-32C, a protobuf
//! `Event` and the data's masked CRC-32C; the messages are declared here with `prost` after
//! TensorFlow's `event.proto`, `summary.proto` and `tensor.proto`, only the fields written.

use crate::{EpochLog, Observer, Unit};
use prost::Message;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

#[derive(Clone, PartialEq, Message)]
pub struct Event {
    #[prost(double, tag = "1")]
    pub wall_time: f64,
    #[prost(int64, tag = "2")]
    pub step: i64,
    #[prost(oneof = "What", tags = "3, 5")]
    pub what: Option<What>,
}

#[derive(Clone, PartialEq, prost::Oneof)]
pub enum What {
    #[prost(string, tag = "3")]
    FileVersion(String),
    #[prost(message, tag = "5")]
    Summary(Summary),
}

#[derive(Clone, PartialEq, Message)]
pub struct Summary {
    #[prost(message, repeated, tag = "1")]
    pub value: Vec<Value>,
}

#[derive(Clone, PartialEq, Message)]
pub struct Value {
    #[prost(string, tag = "1")]
    pub tag: String,
    #[prost(message, optional, tag = "9")]
    pub metadata: Option<SummaryMetadata>,
    #[prost(oneof = "Kind", tags = "2, 8")]
    pub kind: Option<Kind>,
}

#[derive(Clone, PartialEq, prost::Oneof)]
pub enum Kind {
    #[prost(float, tag = "2")]
    SimpleValue(f32),
    #[prost(message, tag = "8")]
    Tensor(TensorProto),
}

#[derive(Clone, PartialEq, Message)]
pub struct SummaryMetadata {
    #[prost(message, optional, tag = "1")]
    pub plugin_data: Option<PluginData>,
}

#[derive(Clone, PartialEq, Message)]
pub struct PluginData {
    #[prost(string, tag = "1")]
    pub plugin_name: String,
    #[prost(bytes = "vec", tag = "2")]
    pub content: Vec<u8>,
}

#[derive(Clone, PartialEq, Message)]
pub struct TensorProto {
    #[prost(int32, tag = "1")]
    pub dtype: i32,
    #[prost(message, optional, tag = "2")]
    pub tensor_shape: Option<TensorShape>,
    #[prost(bytes = "vec", repeated, tag = "8")]
    pub string_val: Vec<Vec<u8>>,
}

#[derive(Clone, PartialEq, Message)]
pub struct TensorShape {}

/// The hparams plugin's records (`plugin_data.proto`): the experiment (which values and metrics
/// the HParams tab lists) and a session's start (its values).
#[derive(Clone, PartialEq, Message)]
pub struct HParamsPluginData {
    #[prost(int32, tag = "1")]
    pub version: i32,
    #[prost(oneof = "HParamsData", tags = "2, 3")]
    pub data: Option<HParamsData>,
}

#[derive(Clone, PartialEq, prost::Oneof)]
pub enum HParamsData {
    #[prost(message, tag = "2")]
    Experiment(Experiment),
    #[prost(message, tag = "3")]
    SessionStartInfo(SessionStartInfo),
}

#[derive(Clone, PartialEq, Message)]
pub struct Experiment {
    #[prost(double, tag = "3")]
    pub time_created_secs: f64,
    #[prost(message, repeated, tag = "4")]
    pub hparam_infos: Vec<HParamInfo>,
    #[prost(message, repeated, tag = "5")]
    pub metric_infos: Vec<MetricInfo>,
}

#[derive(Clone, PartialEq, Message)]
pub struct HParamInfo {
    #[prost(string, tag = "1")]
    pub name: String,
    /// `DATA_TYPE_STRING` 1, `DATA_TYPE_BOOL` 2, `DATA_TYPE_FLOAT64` 3.
    #[prost(int32, tag = "4")]
    pub r#type: i32,
}

#[derive(Clone, PartialEq, Message)]
pub struct MetricInfo {
    #[prost(message, optional, tag = "1")]
    pub name: Option<MetricName>,
}

#[derive(Clone, PartialEq, Message)]
pub struct MetricName {
    #[prost(string, tag = "1")]
    pub group: String,
    #[prost(string, tag = "2")]
    pub tag: String,
}

#[derive(Clone, PartialEq, Message)]
pub struct SessionStartInfo {
    #[prost(btree_map = "string, message", tag = "1")]
    pub hparams: std::collections::BTreeMap<String, PbValue>,
    #[prost(double, tag = "5")]
    pub start_time_secs: f64,
}

/// `google.protobuf.Value`, the kinds a config holds.
#[derive(Clone, PartialEq, Message)]
pub struct PbValue {
    #[prost(oneof = "PbKind", tags = "2, 3, 4")]
    pub kind: Option<PbKind>,
}

#[derive(Clone, PartialEq, prost::Oneof)]
pub enum PbKind {
    #[prost(double, tag = "2")]
    Number(f64),
    #[prost(string, tag = "3")]
    Text(String),
    #[prost(bool, tag = "4")]
    Bool(bool),
}

/// TensorFlow's `DT_STRING`.
const DT_STRING: i32 = 7;

/// CRC-32C as TFRecord frames use it: rotated and offset, so a CRC over data holding CRCs stays
/// strong.
fn masked_crc(data: &[u8]) -> u32 {
    let c = crc32c::crc32c(data);
    c.rotate_right(15).wrapping_add(0xa282_ead8)
}

/// An event file being written; records are appended as they come, so TensorBoard shows a
/// training while it runs.
pub struct EventWriter {
    out: BufWriter<File>,
    path: PathBuf,
}

impl EventWriter {
    /// Creates `dir` and a new event file in it.
    pub fn create(dir: &Path) -> std::io::Result<EventWriter> {
        std::fs::create_dir_all(dir)?;
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        let host = std::fs::read_to_string("/etc/hostname").map(|h| h.trim().to_owned()).unwrap_or_default();
        let host = if host.is_empty() { "localhost".to_owned() } else { host };
        let path = dir.join(format!("events.out.tfevents.{}.{host}.{}", now.as_secs(), std::process::id()));
        let mut w = EventWriter { out: BufWriter::new(File::create(&path)?), path };
        w.write(Event {
            wall_time: now.as_secs_f64(),
            step: 0,
            what: Some(What::FileVersion("brain.Event:2".into())),
        })?;
        Ok(w)
    }

    /// A new event file in `dir`, the event files already there removed: a run's `tb/` folder
    /// describes the run it sits in, and a replaced run replaces its curves.
    pub fn replacing(dir: &Path) -> std::io::Result<EventWriter> {
        if let Ok(entries) = std::fs::read_dir(dir) {
            for e in entries.flatten() {
                if e.file_name().to_string_lossy().starts_with("events.out.tfevents.") {
                    std::fs::remove_file(e.path())?;
                }
            }
        }
        EventWriter::create(dir)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn write(&mut self, e: Event) -> std::io::Result<()> {
        let data = e.encode_to_vec();
        let len = (data.len() as u64).to_le_bytes();
        self.out.write_all(&len)?;
        self.out.write_all(&masked_crc(&len).to_le_bytes())?;
        self.out.write_all(&data)?;
        self.out.write_all(&masked_crc(&data).to_le_bytes())
    }

    fn summary(&mut self, step: u64, value: Value) -> std::io::Result<()> {
        let wall_time = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs_f64();
        self.write(Event { wall_time, step: step as i64, what: Some(What::Summary(Summary { value: vec![value] })) })
    }

    /// A scalar curve point.
    pub fn scalar(&mut self, tag: &str, step: u64, v: f64) -> std::io::Result<()> {
        self.summary(step, Value { tag: tag.into(), metadata: None, kind: Some(Kind::SimpleValue(v as f32)) })
    }

    /// A text (markdown) entry, as TensorBoard's text tab shows it.
    pub fn text(&mut self, tag: &str, step: u64, text: &str) -> std::io::Result<()> {
        let metadata =
            SummaryMetadata { plugin_data: Some(PluginData { plugin_name: "text".into(), content: vec![] }) };
        let tensor =
            TensorProto { dtype: DT_STRING, tensor_shape: Some(TensorShape {}), string_val: vec![text.into()] };
        self.summary(step, Value { tag: tag.into(), metadata: Some(metadata), kind: Some(Kind::Tensor(tensor)) })
    }

    /// The run's hyperparameters for TensorBoard's HParams tab, which compares runs by them
    /// against `metrics` (scalar tags such as `valid/ndcg@10`): the experiment and the session's
    /// start.
    pub fn hparams(
        &mut self,
        params: std::collections::BTreeMap<String, PbKind>,
        metrics: &[&str],
    ) -> std::io::Result<()> {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs_f64();
        // Without metrics no experiment is written: TensorBoard builds one from the sessions.
        if !metrics.is_empty() {
            let experiment = Experiment {
                time_created_secs: now,
                hparam_infos: params
                    .iter()
                    .map(|(name, v)| HParamInfo {
                        name: name.clone(),
                        r#type: match v {
                            PbKind::Text(_) => 1,
                            PbKind::Bool(_) => 2,
                            PbKind::Number(_) => 3,
                        },
                    })
                    .collect(),
                metric_infos: metrics
                    .iter()
                    .map(|t| MetricInfo { name: Some(MetricName { group: String::new(), tag: (*t).to_owned() }) })
                    .collect(),
            };
            self.plugin("_hparams_/experiment", HParamsData::Experiment(experiment))?;
        }
        let start = SessionStartInfo {
            hparams: params.into_iter().map(|(k, v)| (k, PbValue { kind: Some(v) })).collect(),
            start_time_secs: now,
        };
        self.plugin("_hparams_/session_start_info", HParamsData::SessionStartInfo(start))
    }

    fn plugin(&mut self, tag: &str, data: HParamsData) -> std::io::Result<()> {
        let content = HParamsPluginData { version: 0, data: Some(data) }.encode_to_vec();
        let metadata = SummaryMetadata { plugin_data: Some(PluginData { plugin_name: "hparams".into(), content }) };
        self.summary(0, Value { tag: tag.into(), metadata: Some(metadata), kind: None })
    }

    pub fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }
}

/// A config's `[model]` and `[train]` values as hyperparameters (`model.dim`, `train.lr`, ...):
/// numbers, strings and booleans; lists as their JSON text.
pub fn config_hparams(cfg: &crate::Config) -> std::collections::BTreeMap<String, PbKind> {
    let mut out = std::collections::BTreeMap::new();
    let Ok(v) = serde_json::to_value(cfg) else { return out };
    for section in ["model", "train"] {
        let Some(fields) = v.get(section).and_then(|s| s.as_object()) else { continue };
        for (k, v) in fields {
            let kind = match v {
                serde_json::Value::Number(n) => n.as_f64().map(PbKind::Number),
                serde_json::Value::String(s) => Some(PbKind::Text(s.clone())),
                serde_json::Value::Bool(b) => Some(PbKind::Bool(*b)),
                serde_json::Value::Array(_) => Some(PbKind::Text(v.to_string())),
                _ => None,
            };
            if let Some(kind) = kind {
                out.insert(format!("{section}.{k}"), kind);
            }
        }
    }
    out
}

/// Steps between two points of the training curves unless told otherwise.
pub const DEFAULT_EVERY: u64 = 50;

/// Where a run's event files go unless told otherwise.
pub const RUN_DIR: &str = "tb";

/// Writes training's progress to an event file and hands every call on to `inner`: the mean
/// loss, the learning rate and samples/s every `every` steps; the epoch's loss, throughput and
/// validation HR@10 and NDCG@10 at each epoch's end (flushed then). A log that cannot be
/// created, or a write that fails, is reported once as a note and logging stops; training goes
/// on.
pub struct Board<'a> {
    inner: &'a mut dyn Observer,
    w: Option<EventWriter>,
    every: u64,
    step: u64,
    loss_sum: f64,
    losses: u64,
    /// Samples done in the current epoch, and when the last point was written with how many.
    done: u64,
    mark: (Instant, u64),
    training: bool,
}

impl<'a> Board<'a> {
    /// Logs into a new event file in `dir` (its older event files removed, see
    /// [`EventWriter::replacing`]) every `every` steps (at least 1).
    pub fn new(inner: &'a mut dyn Observer, dir: &Path, every: u64) -> Board<'a> {
        let w = match EventWriter::replacing(dir) {
            Ok(w) => Some(w),
            Err(e) => {
                inner.note(&format!("warning: cannot write TensorBoard logs to {}: {e}", dir.display()));
                None
            }
        };
        Board {
            inner,
            w,
            every: every.max(1),
            step: 0,
            loss_sum: 0.0,
            losses: 0,
            done: 0,
            mark: (Instant::now(), 0),
            training: false,
        }
    }

    /// Writes the config at step 0: as TOML text, and its model and training values as
    /// hyperparameters.
    pub fn config(&mut self, cfg: &crate::Config) {
        let text = format!("```toml\n{}\n```", toml::to_string_pretty(cfg).unwrap_or_default());
        self.log(|w| {
            w.text("config", 0, &text)?;
            w.hparams(config_hparams(cfg), &["valid/hr@10", "valid/ndcg@10", "epoch/loss"])
        });
    }

    fn log(&mut self, f: impl FnOnce(&mut EventWriter) -> std::io::Result<()>) {
        if let Some(w) = self.w.as_mut() {
            if let Err(e) = f(w) {
                let path = w.path().display().to_string();
                self.w = None;
                self.inner.note(&format!("warning: TensorBoard log {path} not written further: {e}"));
            }
        }
    }
}

impl Drop for Board<'_> {
    /// What the test evaluation added after the last epoch reaches the file too.
    fn drop(&mut self) {
        if let Some(w) = self.w.as_mut() {
            let _ = w.flush();
        }
    }
}

impl Observer for Board<'_> {
    fn begin(&mut self, name: &str, unit: Unit, total: u64) {
        self.training = unit == Unit::Samples;
        self.done = 0;
        self.mark = (Instant::now(), 0);
        self.inner.begin(name, unit, total)
    }

    fn progress(&mut self, done: u64, status: &str) {
        if self.training {
            self.done = done;
        }
        self.inner.progress(done, status)
    }

    fn step(&mut self, step: u64, loss: f64, lr: f32) {
        self.step = step;
        self.loss_sum += loss;
        self.losses += 1;
        if step.is_multiple_of(self.every) {
            let mean = self.loss_sum / self.losses as f64;
            let (since, was) = self.mark;
            let rate = (self.done.saturating_sub(was)) as f64 / since.elapsed().as_secs_f64().max(1e-9);
            self.mark = (Instant::now(), self.done);
            (self.loss_sum, self.losses) = (0.0, 0);
            self.log(|w| {
                w.scalar("train/loss", step, mean)?;
                w.scalar("train/lr", step, f64::from(lr))?;
                w.scalar("train/samples_per_sec", step, rate)
            });
        }
        self.inner.step(step, loss, lr)
    }

    fn end(&mut self) {
        self.inner.end()
    }

    fn note(&mut self, line: &str) {
        self.inner.note(line)
    }

    fn epoch(&mut self, rec: &EpochLog) {
        let step = self.step;
        self.log(|w| {
            w.scalar("epoch/loss", step, rec.loss)?;
            w.scalar("epoch/samples_per_sec", step, rec.samples_per_sec)?;
            w.scalar("valid/hr@10", step, rec.valid_hr10)?;
            w.scalar("valid/ndcg@10", step, rec.valid_ndcg10)?;
            w.scalar("epoch", step, rec.epoch as f64)?;
            w.flush()
        });
        self.inner.epoch(rec)
    }

    fn should_stop(&self) -> bool {
        self.inner.should_stop()
    }
}

/// A trial's changed values (`model.dim = 32, train.lr = 0.002`) as hyperparameters; a list
/// value (`[64, 32]`) stays one text value.
fn trial_values(params: &str) -> std::collections::BTreeMap<String, PbKind> {
    let mut pairs: Vec<String> = Vec::new();
    for part in params.split(", ") {
        match pairs.last_mut() {
            Some(last) if !part.contains(" = ") => {
                last.push_str(", ");
                last.push_str(part);
            }
            _ => pairs.push(part.to_owned()),
        }
    }
    pairs
        .iter()
        .filter_map(|p| p.split_once(" = "))
        .map(|(k, v)| {
            let kind = match v {
                "true" => PbKind::Bool(true),
                "false" => PbKind::Bool(false),
                _ => match v.parse::<f64>() {
                    Ok(n) => PbKind::Number(n),
                    Err(_) => PbKind::Text(v.trim_matches('"').to_owned()),
                },
            };
            (k.to_owned(), kind)
        })
        .collect()
}

/// Writes a tune's trials to TensorBoard, one run (folder `trial-N`) each, so their validation
/// curves overlay: HR@10, NDCG@10 and seconds per epoch, and each trial's values as text; hands
/// every call on to `inner`.
pub struct TuneBoard<'a> {
    inner: &'a mut dyn needle_train::tune::TuneObserver,
    dir: PathBuf,
    trials: std::collections::HashMap<usize, EventWriter>,
}

impl<'a> TuneBoard<'a> {
    /// Trials go to `dir/trial-N`; event files already in `dir` are left to the runs they
    /// describe (a resumed tune adds to them).
    pub fn new(inner: &'a mut dyn needle_train::tune::TuneObserver, dir: &Path) -> TuneBoard<'a> {
        TuneBoard { inner, dir: dir.to_path_buf(), trials: Default::default() }
    }
}

impl needle_train::tune::TuneObserver for TuneBoard<'_> {
    fn planned(
        &mut self,
        trials: usize,
        rungs: &[(usize, usize)],
        short: Option<&needle_train::tune::BudgetShort>,
    ) -> Result<(), needle_train::TrainError> {
        self.inner.planned(trials, rungs, short)
    }

    fn epoch(
        &mut self,
        rec: &needle_train::tune::TrialEpoch,
        best: (f64, usize),
    ) -> Result<(), needle_train::TrainError> {
        let io = |e: std::io::Error| needle_train::TrainError::Io { path: RUN_DIR.into(), source: e };
        if !self.trials.contains_key(&rec.trial) {
            let mut w = EventWriter::create(&self.dir.join(format!("trial-{}", rec.trial))).map_err(io)?;
            w.text("values", 0, &rec.params).map_err(io)?;
            w.hparams(trial_values(&rec.params), &[]).map_err(io)?;
            self.trials.insert(rec.trial, w);
        }
        if let Some(w) = self.trials.get_mut(&rec.trial) {
            let step = rec.epoch as u64;
            w.scalar("valid/hr@10", step, rec.valid_hr10).map_err(io)?;
            w.scalar("valid/ndcg@10", step, rec.valid_ndcg10).map_err(io)?;
            w.scalar("epoch/seconds", step, rec.seconds).map_err(io)?;
            w.flush().map_err(io)?;
        }
        self.inner.epoch(rec, best)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reads an event file back, checking every frame's CRCs.
    fn read(path: &Path) -> Vec<Event> {
        let bytes = std::fs::read(path).unwrap();
        let mut at = 0;
        let mut out = Vec::new();
        while at < bytes.len() {
            let len = &bytes[at..at + 8];
            assert_eq!(masked_crc(len).to_le_bytes(), bytes[at + 8..at + 12]);
            let n = u64::from_le_bytes(len.try_into().unwrap()) as usize;
            let data = &bytes[at + 12..at + 12 + n];
            assert_eq!(masked_crc(data).to_le_bytes(), bytes[at + 12 + n..at + 16 + n]);
            out.push(Event::decode(data).unwrap());
            at += 16 + n;
        }
        out
    }

    #[test]
    fn trial_values_split_on_keys_not_on_list_commas() {
        let v = trial_values(
            "model.hidden = [64, 32], train.lr = 0.002, train.loss = \"sampled\", model.cold_items = true",
        );
        assert_eq!(v["model.hidden"], PbKind::Text("[64, 32]".into()));
        assert_eq!(v["train.lr"], PbKind::Number(0.002));
        assert_eq!(v["train.loss"], PbKind::Text("sampled".into()));
        assert_eq!(v["model.cold_items"], PbKind::Bool(true));
        assert!(trial_values("(as written)").is_empty());
    }

    /// CRC-32C's check value; the masking is checked end to end by TensorBoard's own reader in
    /// the Python tests (`tbparse`).
    #[test]
    fn crc_is_castagnoli() {
        assert_eq!(crc32c::crc32c(b"123456789"), 0xe306_9283);
    }

    #[test]
    fn a_training_writes_curves_epochs_and_its_config() {
        let dir = tempfile::tempdir().unwrap();
        let mut quiet = crate::Silent;
        let mut b = Board::new(&mut quiet, dir.path(), 2);
        let path = b.w.as_ref().unwrap().path().to_owned();
        let cfg = crate::parse_config("[data]\ndataset = \"ml-1m\"\n[model]\nkind = \"sequential\"", "test").unwrap();
        b.config(&cfg);
        b.begin("epoch 1/1", Unit::Samples, 100);
        for s in 1..=4 {
            b.progress(s * 25, "");
            b.step(s, 1.0 / s as f64, 0.01);
        }
        b.end();
        b.epoch(&EpochLog {
            epoch: 1,
            loss: 0.5,
            valid_hr10: 0.25,
            valid_ndcg10: 0.125,
            seconds: 1.0,
            samples_per_sec: 100.0,
        });
        drop(b);
        let events = read(&path);
        assert_eq!(events[0].what, Some(What::FileVersion("brain.Event:2".into())));
        let scalars: Vec<(String, i64, f32)> = events
            .iter()
            .filter_map(|e| match &e.what {
                Some(What::Summary(s)) => match &s.value[0].kind {
                    Some(Kind::SimpleValue(v)) => Some((s.value[0].tag.clone(), e.step, *v)),
                    _ => None,
                },
                _ => None,
            })
            .collect();
        let loss: Vec<_> = scalars.iter().filter(|s| s.0 == "train/loss").map(|s| (s.1, s.2)).collect();
        assert_eq!(loss, vec![(2, 0.75), (4, ((1.0f64 / 3.0 + 0.25) / 2.0) as f32)]);
        assert!(scalars.iter().any(|s| s.0 == "valid/ndcg@10" && s.1 == 4 && s.2 == 0.125));
        assert!(scalars.iter().any(|s| s.0 == "train/lr" && s.2 == 0.01));
        let text = events.iter().find_map(|e| match &e.what {
            Some(What::Summary(s)) if s.value[0].tag == "config" => Some(s.value[0].clone()),
            _ => None,
        });
        let Some(Value { kind: Some(Kind::Tensor(t)), metadata: Some(m), .. }) = text else { panic!("no config text") };
        assert_eq!(m.plugin_data.unwrap().plugin_name, "text");
        assert!(String::from_utf8_lossy(&t.string_val[0]).contains("kind = \"sequential\""));
        let hp = events.iter().find_map(|e| match &e.what {
            Some(What::Summary(s)) if s.value[0].tag == "_hparams_/session_start_info" => s.value[0].metadata.clone(),
            _ => None,
        });
        let data = HParamsPluginData::decode(&hp.unwrap().plugin_data.unwrap().content[..]).unwrap();
        let Some(HParamsData::SessionStartInfo(start)) = data.data else { panic!("no session start") };
        let params = start.hparams;
        assert_eq!(params["model.kind"].kind, Some(PbKind::Text("sequential".into())));
        assert!(matches!(params["train.lr"].kind, Some(PbKind::Number(_))));
    }
}
