//! One guest's spool directory: jobs written through a descriptor of the directory with names
//! the host makes, their states and the quota (see [`super::host`] for the rules).

use std::collections::{BTreeMap, HashMap};
use std::ffi::CStr;
use std::io;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustix::fs::{AtFlags, Mode, OFlags, RenameFlags};
use serde::Serialize;
use serde_json::json;

use crate::status::Sample;

use super::{sanitize, JobType, Record, HEAD_LEN};

/// Settings of one guest's spool (`[guest.printer]` in vstreamd's config).
#[derive(Debug, Clone)]
pub struct SpoolConfig {
    /// The directory (created 0700 if missing).
    pub dir: PathBuf,
    /// Most bytes the directory may hold.
    pub quota_bytes: u64,
    /// Program and arguments run after each finished job, with the file's path and type
    /// appended (empty: none).
    pub hook: Vec<String>,
    /// The hook is killed after this long.
    pub hook_timeout: Duration,
}

/// A job's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    /// Bytes are arriving.
    Receiving,
    /// Complete: under its final name.
    Done,
    /// Cut: kept as `*.partial`.
    Partial,
    /// Refused (quota): nothing kept.
    Refused,
}

/// One job, as listed by `vstreamctl jobs`.
#[derive(Debug, Clone, Serialize)]
pub struct JobRecord {
    /// Number (in the file name).
    pub id: u64,
    /// State.
    pub state: JobState,
    /// File name in the spool (none for refused jobs).
    pub file: Option<String>,
    /// Detected type.
    #[serde(rename = "type")]
    pub job_type: Option<JobType>,
    /// Bytes received (done, partial, receiving) or refused at.
    pub size: u64,
    /// Guest metadata, sanitised: title.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
    /// Guest metadata, sanitised: where the agent accepted the job.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// Guest metadata, sanitised: the printing client.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peer: Option<String>,
    /// Unix time of the start (or of the file, for jobs found on disk).
    pub started: u64,
    /// Why it is partial or refused.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// What the hook did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hook: Option<String>,
}

/// A job refused because the spool would grow past its quota.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("spool quota exceeded for guest {guest}: job {id} would bring the spool to {would_be} bytes, quota {quota} bytes; job refused (after {after} bytes)")]
pub struct QuotaExceeded {
    /// The guest.
    pub guest: String,
    /// The job.
    pub id: u64,
    /// The spool's size with this job's next bytes.
    pub would_be: u64,
    /// The quota.
    pub quota: u64,
    /// Bytes of the job already taken.
    pub after: u64,
}

/// Receives spool events (`print-job`) as JSON, for vstreamd's event stream.
pub type EventSink = Arc<dyn Fn(serde_json::Value) + Send + Sync>;

pub(super) struct State {
    next_id: u64,
    pub(super) jobs: BTreeMap<u64, JobRecord>,
    /// Bytes of the spool's files that are not jobs in flight, as of the last scan plus
    /// jobs finished since.
    settled_bytes: u64,
    /// Bytes written so far by jobs in flight.
    inflight: HashMap<u64, u64>,
    last_error: Option<String>,
}

/// One guest's spool.
pub struct Spool {
    pub(super) guest: String,
    config: SpoolConfig,
    dir: OwnedFd,
    state: Mutex<State>,
    events: EventSink,
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The spool file name of a job.
pub fn file_name(id: u64, t: JobType, state: JobState) -> String {
    match state {
        JobState::Partial => format!("job-{id:06}.{}.partial", t.extension()),
        _ => format!("job-{id:06}.{}", t.extension()),
    }
}

fn temp_name(id: u64) -> String {
    format!(".job-{id:06}.tmp")
}

/// What a spool directory entry is, if it is one of ours.
#[derive(Debug, PartialEq, Eq)]
enum Entry {
    Final(u64, JobType),
    Partial(u64, JobType),
    Temp(u64),
}

fn parse_name(name: &str) -> Option<Entry> {
    let id = |s: &str| {
        (s.len() >= 6 && s.bytes().all(|b| b.is_ascii_digit()))
            .then(|| s.parse().ok())
            .flatten()
    };
    if let Some(rest) = name
        .strip_prefix(".job-")
        .and_then(|r| r.strip_suffix(".tmp"))
    {
        return id(rest).map(Entry::Temp);
    }
    let rest = name.strip_prefix("job-")?;
    let (rest, partial) = match rest.strip_suffix(".partial") {
        Some(r) => (r, true),
        None => (rest, false),
    };
    let (n, ext) = rest.split_once('.')?;
    let t = JobType::from_extension(ext)?;
    let n = id(n)?;
    Some(if partial {
        Entry::Partial(n, t)
    } else {
        Entry::Final(n, t)
    })
}

fn err_ctx(what: String) -> impl FnOnce(rustix::io::Errno) -> io::Error {
    move |e| {
        let e = io::Error::from(e);
        io::Error::new(e.kind(), format!("{what}: {e}"))
    }
}

impl Spool {
    /// Opens (creating it 0700 if needed) the spool of `guest`; temporary files left by a crash
    /// become partial jobs (reported through `events`).
    pub fn open(guest: &str, config: SpoolConfig, events: EventSink) -> io::Result<Arc<Spool>> {
        std::fs::create_dir_all(&config.dir).map_err(|e| {
            io::Error::new(e.kind(), format!("spool {}: {e}", config.dir.display()))
        })?;
        let dir = rustix::fs::open(
            &config.dir,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(err_ctx(format!("spool {}", config.dir.display())))?;
        let _ = rustix::fs::fchmod(&dir, Mode::from_raw_mode(0o700));
        let spool = Arc::new(Spool {
            guest: guest.to_owned(),
            config,
            dir,
            state: Mutex::new(State {
                next_id: 1,
                jobs: BTreeMap::new(),
                settled_bytes: 0,
                inflight: HashMap::new(),
                last_error: None,
            }),
            events,
        });
        let mut max_id = 0;
        for (name, size, mtime) in spool.scan()? {
            let Some(entry) = parse_name(&name) else {
                continue;
            };
            match entry {
                Entry::Temp(id) => {
                    max_id = max_id.max(id);
                    let head = spool.read_head(&name).unwrap_or_default();
                    let t = JobType::detect(&head);
                    let partial = file_name(id, t, JobState::Partial);
                    spool.rename(&name, &partial)?;
                    let rec = JobRecord {
                        id,
                        state: JobState::Partial,
                        file: Some(partial),
                        job_type: Some(t),
                        size,
                        title: None,
                        source: None,
                        peer: None,
                        started: mtime,
                        reason: Some("vstreamd stopped while the job was arriving".into()),
                        hook: None,
                    };
                    tracing::warn!(
                        guest,
                        id,
                        "print job left incomplete by a previous vstreamd: kept as partial"
                    );
                    spool.report(&rec);
                    spool.lock().jobs.insert(id, rec);
                }
                Entry::Final(id, _) | Entry::Partial(id, _) => max_id = max_id.max(id),
            }
        }
        {
            let mut st = spool.lock();
            st.next_id = max_id + 1;
        }
        spool.rescan()?;
        Ok(spool)
    }

    pub(super) fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The spool directory.
    pub fn dir(&self) -> &Path {
        &self.config.dir
    }

    /// Regular files of the directory: (name, size, mtime).
    fn scan(&self) -> io::Result<Vec<(String, u64, u64)>> {
        let what = format!("spool {}", self.config.dir.display());
        let mut out = Vec::new();
        let dir = rustix::fs::Dir::read_from(&self.dir).map_err(err_ctx(what.clone()))?;
        for entry in dir {
            let entry = entry.map_err(err_ctx(what.clone()))?;
            let name: &CStr = entry.file_name();
            if name.to_bytes() == b"." || name.to_bytes() == b".." {
                continue;
            }
            let Ok(st) = rustix::fs::statat(&self.dir, name, AtFlags::SYMLINK_NOFOLLOW) else {
                continue; // Removed meanwhile.
            };
            if rustix::fs::FileType::from_raw_mode(st.st_mode) != rustix::fs::FileType::RegularFile
            {
                continue;
            }
            out.push((
                name.to_string_lossy().into_owned(),
                st.st_size as u64,
                st.st_mtime as u64,
            ));
        }
        Ok(out)
    }

    /// Recounts the bytes of the files that are not in flight.
    fn rescan(&self) -> io::Result<()> {
        let files = self.scan()?;
        let mut st = self.lock();
        let settled = files
            .iter()
            .filter(|(name, _, _)| !matches!(parse_name(name), Some(Entry::Temp(id)) if st.inflight.contains_key(&id)))
            .map(|(_, size, _)| *size)
            .sum();
        st.settled_bytes = settled;
        Ok(())
    }

    fn read_head(&self, name: &str) -> io::Result<Vec<u8>> {
        let fd = rustix::fs::openat(
            &self.dir,
            name,
            OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        use std::io::Read;
        let f = std::fs::File::from(fd);
        let mut head = Vec::with_capacity(HEAD_LEN);
        f.take(HEAD_LEN as u64).read_to_end(&mut head)?;
        Ok(head)
    }

    fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        rustix::fs::renameat_with(&self.dir, from, &self.dir, to, RenameFlags::NOREPLACE).map_err(
            err_ctx(format!(
                "spool {}: rename {from} to {to}",
                self.config.dir.display()
            )),
        )?;
        rustix::fs::fsync(&self.dir).map_err(err_ctx(format!(
            "spool {}: fsync",
            self.config.dir.display()
        )))
    }

    /// Bytes in the spool now (files plus jobs in flight).
    pub fn used_bytes(&self) -> u64 {
        let st = self.lock();
        st.settled_bytes + st.inflight.values().sum::<u64>()
    }

    /// The jobs: those on disk (done and partial, including files from earlier runs) and, from
    /// this run, those refused and those arriving. Sorted by id.
    pub fn jobs(&self) -> io::Result<Vec<JobRecord>> {
        let files = self.scan()?;
        let st = self.lock();
        let mut out: BTreeMap<u64, JobRecord> = BTreeMap::new();
        for (name, size, mtime) in files {
            let (id, t, state) = match parse_name(&name) {
                Some(Entry::Final(id, t)) => (id, t, JobState::Done),
                Some(Entry::Partial(id, t)) => (id, t, JobState::Partial),
                _ => continue,
            };
            let mut rec = st.jobs.get(&id).cloned().unwrap_or(JobRecord {
                id,
                state,
                file: None,
                job_type: Some(t),
                size,
                title: None,
                source: None,
                peer: None,
                started: mtime,
                reason: None,
                hook: None,
            });
            rec.state = state;
            rec.file = Some(name);
            rec.size = size;
            out.insert(id, rec);
        }
        for (id, rec) in st.jobs.iter() {
            if matches!(rec.state, JobState::Refused | JobState::Receiving) {
                let mut rec = rec.clone();
                if let Some(n) = st.inflight.get(id) {
                    rec.size = *n;
                }
                out.insert(*id, rec);
            }
        }
        Ok(out.into_values().collect())
    }

    /// Status for `vstreamctl status`.
    pub fn status(&self) -> PrinterStatus {
        let jobs = self.jobs().unwrap_or_default();
        let count = |s: JobState| jobs.iter().filter(|j| j.state == s).count();
        PrinterStatus {
            spool: self.config.dir.display().to_string(),
            quota_bytes: self.config.quota_bytes,
            used_bytes: self.used_bytes(),
            jobs: JobCounts {
                done: count(JobState::Done),
                partial: count(JobState::Partial),
                refused: count(JobState::Refused),
                receiving: count(JobState::Receiving),
            },
            last_error: self.lock().last_error.clone(),
        }
    }

    pub(super) fn report(&self, rec: &JobRecord) {
        let mut v = serde_json::to_value(rec).unwrap_or_default();
        v["event"] = json!("print-job");
        (self.events)(v);
    }

    fn set_error(&self, e: &str) {
        self.lock().last_error = Some(e.to_owned());
    }

    /// Starts a job: checks the quota, creates its temporary file.
    pub(super) fn begin(
        &self,
        meta: &[(String, String)],
    ) -> Result<(u64, std::fs::File), (u64, String)> {
        let clean = |k: &str| {
            Record::meta(meta, k)
                .map(sanitize)
                .filter(|v| !v.is_empty())
        };
        if let Err(e) = self.rescan() {
            tracing::warn!(guest = %self.guest, "{e}");
        }
        let mut st = self.lock();
        let id = st.next_id;
        st.next_id += 1;
        let mut rec = JobRecord {
            id,
            state: JobState::Receiving,
            file: None,
            job_type: None,
            size: 0,
            title: clean("title"),
            source: clean("source"),
            peer: clean("peer"),
            started: now(),
            reason: None,
            hook: None,
        };
        let used = st.settled_bytes + st.inflight.values().sum::<u64>();
        if used >= self.config.quota_bytes {
            let why = format!(
                "spool quota exceeded for guest {}: {used} of {} bytes used; job {id} refused",
                self.guest, self.config.quota_bytes
            );
            rec.state = JobState::Refused;
            rec.reason = Some(why.clone());
            st.jobs.insert(id, rec);
            return Err((id, why));
        }
        let opened = rustix::fs::openat(
            &self.dir,
            temp_name(id).as_str(),
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o600),
        );
        match opened {
            Ok(fd) => {
                st.inflight.insert(id, 0);
                st.jobs.insert(id, rec);
                Ok((id, std::fs::File::from(fd)))
            }
            Err(e) => {
                let why = format!(
                    "cannot create {} in spool {}: {}",
                    temp_name(id),
                    self.config.dir.display(),
                    io::Error::from(e)
                );
                rec.state = JobState::Refused;
                rec.reason = Some(why.clone());
                st.jobs.insert(id, rec);
                st.last_error = Some(why.clone());
                Err((id, why))
            }
        }
    }

    /// Accounts `n` more bytes of job `id`; `Err` if that would exceed the quota.
    pub(super) fn reserve(&self, id: u64, n: u64) -> Result<(), QuotaExceeded> {
        let mut st = self.lock();
        let used = st.settled_bytes + st.inflight.values().sum::<u64>();
        if used + n > self.config.quota_bytes {
            return Err(QuotaExceeded {
                guest: self.guest.clone(),
                id,
                would_be: used + n,
                quota: self.config.quota_bytes,
                after: st.inflight.get(&id).copied().unwrap_or(0),
            });
        }
        *st.inflight.entry(id).or_insert(0) += n;
        Ok(())
    }

    /// Ends a job: done, partial or refused. Returns its record.
    pub(super) fn finish(
        &self,
        id: u64,
        state: JobState,
        head: &[u8],
        reason: Option<String>,
    ) -> JobRecord {
        let t = JobType::detect(head);
        let temp = temp_name(id);
        let mut file = None;
        let mut state = state;
        let mut reason = reason;
        match state {
            JobState::Done | JobState::Partial => {
                let name = file_name(id, t, state);
                match self.rename(&temp, &name) {
                    Ok(()) => file = Some(name),
                    Err(e) => {
                        tracing::error!(guest = %self.guest, "{e}");
                        self.set_error(&e.to_string());
                        state = JobState::Partial;
                        reason = Some(e.to_string());
                        file = Some(temp);
                    }
                }
            }
            JobState::Refused => {
                if let Err(e) = rustix::fs::unlinkat(&self.dir, temp.as_str(), AtFlags::empty()) {
                    tracing::warn!(guest = %self.guest, "removing {temp}: {}", io::Error::from(e));
                }
            }
            JobState::Receiving => {}
        }
        let mut st = self.lock();
        let size = st.inflight.remove(&id).unwrap_or(0);
        if state != JobState::Refused {
            st.settled_bytes += size;
        }
        let rec = st.jobs.entry(id).or_insert_with(|| JobRecord {
            id,
            state,
            file: None,
            job_type: None,
            size: 0,
            title: None,
            source: None,
            peer: None,
            started: now(),
            reason: None,
            hook: None,
        });
        rec.state = state;
        rec.file = file;
        rec.job_type = Some(t);
        rec.size = size;
        rec.reason = reason;
        let rec = rec.clone();
        drop(st);
        rec
    }

    fn set_hook_result(&self, id: u64, result: String) {
        if let Some(r) = self.lock().jobs.get_mut(&id) {
            r.hook = Some(result);
        }
    }

    /// Runs the hook for a finished job (in the background).
    pub(super) fn run_hook(self: &Arc<Self>, rec: &JobRecord) {
        let Some(program) = self.config.hook.first().cloned() else {
            return;
        };
        let Some(file) = rec.file.clone() else { return };
        let path = self.config.dir.join(&file);
        let t = rec.job_type.unwrap_or(JobType::Unknown).name();
        let mut cmd = tokio::process::Command::new(&program);
        cmd.args(&self.config.hook[1..])
            .arg(&path)
            .arg(t)
            .env("VSTREAM_GUEST", &self.guest)
            .env("VSTREAM_JOB_ID", rec.id.to_string())
            .env("VSTREAM_JOB_FILE", &path)
            .env("VSTREAM_JOB_TYPE", t)
            .env("VSTREAM_JOB_SIZE", rec.size.to_string())
            .env("VSTREAM_JOB_TITLE", rec.title.clone().unwrap_or_default())
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true);
        let spool = self.clone();
        let id = rec.id;
        let timeout = self.config.hook_timeout;
        tokio::spawn(async move {
            let result = match cmd.spawn() {
                Err(e) => format!("cannot run {program}: {e}"),
                Ok(child) => match tokio::time::timeout(timeout, child.wait_with_output()).await {
                    Err(_) => format!("{program} killed after {} s", timeout.as_secs()),
                    Ok(Err(e)) => format!("{program}: {e}"),
                    Ok(Ok(out)) => {
                        let text = String::from_utf8_lossy(&out.stderr);
                        let text = text.trim();
                        if out.status.success() {
                            "ok".to_owned()
                        } else {
                            format!("{program} failed ({}): {}", out.status, sanitize(text))
                        }
                    }
                },
            };
            if result == "ok" {
                tracing::info!(guest = %spool.guest, job = id, "print hook done");
            } else {
                tracing::warn!(guest = %spool.guest, job = id, "print hook: {result}");
                spool.set_error(&format!("hook for job {id}: {result}"));
            }
            spool.set_hook_result(id, result);
        });
    }
}

/// Checks a name is one the spool makes (for tests of hostile inputs).
pub fn is_spool_name(name: &str) -> bool {
    parse_name(name).is_some()
}

impl std::fmt::Debug for Spool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Spool({}, {})", self.guest, self.config.dir.display())
    }
}

/// The printer's status (`devices.printer` in `vstreamctl status`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PrinterStatus {
    /// The spool directory.
    pub spool: String,
    /// Bytes the spool may hold.
    pub quota_bytes: u64,
    /// Bytes it holds.
    pub used_bytes: u64,
    /// Jobs in the spool, by state.
    pub jobs: JobCounts,
    /// The last error.
    pub last_error: Option<String>,
}

/// Print jobs by state.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct JobCounts {
    /// Complete.
    pub done: usize,
    /// Cut short.
    pub partial: usize,
    /// Refused (over the quota).
    pub refused: usize,
    /// Still coming.
    pub receiving: usize,
}

impl crate::status::Samples for PrinterStatus {
    fn samples(&self) -> Vec<Sample> {
        const JOBS: &str = "Print jobs in the spool, by state.";
        let j = &self.jobs;
        vec![
            Sample::gauge("jobs", JOBS, j.done as f64).label("state", "done"),
            Sample::gauge("jobs", JOBS, j.partial as f64).label("state", "partial"),
            Sample::gauge("jobs", JOBS, j.refused as f64).label("state", "refused"),
            Sample::gauge("jobs", JOBS, j.receiving as f64).label("state", "receiving"),
            Sample::gauge(
                "spool_used_bytes",
                "Bytes the spool holds.",
                self.used_bytes as f64,
            ),
            Sample::gauge(
                "spool_quota_bytes",
                "Bytes the spool may hold.",
                self.quota_bytes as f64,
            ),
        ]
    }
}
