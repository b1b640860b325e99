//! Running programs: `guest-exec` and `guest-exec-status`.

use super::*;

// ---------------------------------------------------------------------------------------------
// Exec.

pub(super) struct Proc {
    state: Mutex<ProcState>,
}

#[derive(Default)]
pub(super) struct ProcState {
    status: Option<std::process::ExitStatus>,
    out: Output,
    err: Output,
    /// Output readers still running.
    readers: u8,
    /// Bytes counted against the agent's budget.
    held: usize,
}

#[derive(Default)]
pub(super) struct Output {
    enabled: bool,
    data: Vec<u8>,
    truncated: bool,
}

#[derive(Clone, Copy)]
pub(super) enum Which {
    Out,
    Err,
}

/// Takes up to `want` bytes from the shared budget; returns how many it got.
pub(super) fn reserve(budget: &AtomicUsize, want: usize) -> usize {
    let mut cur = budget.load(Ordering::Relaxed);
    loop {
        let got = want.min(EXEC_OUTPUT_BUDGET.saturating_sub(cur));
        if got == 0 {
            return 0;
        }
        match budget.compare_exchange_weak(cur, cur + got, Ordering::AcqRel, Ordering::Relaxed) {
            Ok(_) => return got,
            Err(now) => cur = now,
        }
    }
}

/// Reads a child's pipe to its end, keeping what the limits allow.
pub(super) fn capture(
    proc: Arc<Proc>,
    budget: Arc<AtomicUsize>,
    mut pipe: impl Read,
    which: Which,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match pipe.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        };
        let mut st = lock(&proc.state);
        let out = match which {
            Which::Out => &mut st.out,
            Which::Err => &mut st.err,
        };
        let room = MAX_EXEC_OUTPUT.saturating_sub(out.data.len());
        let got = reserve(&budget, n.min(room));
        out.data.extend_from_slice(&buf[..got]);
        if got < n {
            out.truncated = true;
        }
        st.held += got;
    }
    lock(&proc.state).readers -= 1;
}

impl GuestAgent {
    pub(super) fn exec(&self, a: ExecArgs) -> Result<GuestExec, QgaError> {
        if lock(&self.state).procs.len() >= MAX_PROCESSES {
            return Err(QgaError::generic(format!(
                "too many processes: {MAX_PROCESSES} started by guest-exec are running or not yet \
                 collected with guest-exec-status"
            )));
        }
        let input = match &a.input_data {
            Some(b64) => Some(
                base64_decode(b64)
                    .ok_or_else(|| QgaError::invalid_value("input-data", "base64 data"))?,
            ),
            None => None,
        };
        let mut cmd = std::process::Command::new(&a.path);
        crate::spawn::undo_inherited(&mut cmd);
        cmd.args(&a.arg);
        if let Some(env) = &a.env {
            cmd.env_clear();
            for (i, kv) in env.iter().enumerate() {
                let Some((k, v)) = kv.split_once('=') else {
                    return Err(QgaError::invalid_value(&format!("env[{i}]"), "KEY=VALUE"));
                };
                cmd.env(k, v);
            }
        }
        cmd.stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        });
        let (out_on, err_on) = match a.capture {
            Capture::None => (false, false),
            Capture::Stdout => (true, false),
            Capture::Stderr => (false, true),
            Capture::Separated => (true, true),
            Capture::Merged => (true, false),
        };
        let mut merged_reader = None;
        if a.capture == Capture::Merged {
            let (r, w) = io::pipe().map_err(|e| QgaError::io("cannot create a pipe", &e))?;
            let w2 = w
                .try_clone()
                .map_err(|e| QgaError::io("cannot create a pipe", &e))?;
            cmd.stdout(w).stderr(w2);
            merged_reader = Some(r);
        } else {
            cmd.stdout(if out_on {
                Stdio::piped()
            } else {
                Stdio::null()
            });
            cmd.stderr(if err_on {
                Stdio::piped()
            } else {
                Stdio::null()
            });
        }
        let spawned = cmd.spawn();
        drop(cmd); // Closes our copies of the merged pipe's write end.
        let mut child = spawned.map_err(|e| {
            QgaError::generic(format!(
                "Guest agent command failed, error was 'Failed to execute child process \u{201c}{}\u{201d} ({})'",
                a.path,
                errstr(&e)
            ))
        })?;
        let pid = i64::from(child.id());
        let proc = Arc::new(Proc {
            state: Mutex::new(ProcState {
                out: Output {
                    enabled: out_on,
                    ..Output::default()
                },
                err: Output {
                    enabled: err_on,
                    ..Output::default()
                },
                ..ProcState::default()
            }),
        });
        let spawn = |name: String, f: Box<dyn FnOnce() + Send>| {
            std::thread::Builder::new().name(name).spawn(f)
        };
        let mut readers: Vec<(Box<dyn Read + Send>, Which)> = Vec::new();
        if let Some(r) = merged_reader {
            readers.push((Box::new(r), Which::Out));
        }
        if let Some(o) = child.stdout.take() {
            readers.push((Box::new(o), Which::Out));
        }
        if let Some(e) = child.stderr.take() {
            readers.push((Box::new(e), Which::Err));
        }
        lock(&proc.state).readers = readers.len() as u8;
        for (pipe, which) in readers {
            let (p, b) = (proc.clone(), self.captured.clone());
            if let Err(e) = spawn(
                format!("qga-out-{pid}"),
                Box::new(move || capture(p, b, pipe, which)),
            ) {
                // The pipe went down with the closure: the child sees EPIPE, we see no data.
                lock(&proc.state).readers -= 1;
                tracing::warn!("guest-exec {pid}: cannot start an output reader: {e}");
            }
        }
        if let (Some(data), Some(mut stdin)) = (input, child.stdin.take()) {
            let _ = spawn(
                format!("qga-in-{pid}"),
                Box::new(move || {
                    // A child that exits without reading its input is not an error.
                    let _ = stdin.write_all(&data);
                }),
            );
        }
        let p = proc.clone();
        let waiter = spawn(
            format!("qga-wait-{pid}"),
            Box::new(move || {
                let status = child.wait();
                let mut st = lock(&p.state);
                st.status = Some(status.unwrap_or_else(|_| ExitStatusExt::from_raw(255 << 8)));
            }),
        );
        if let Err(e) = waiter {
            // Cannot happen short of thread exhaustion; the child is then never reaped by us,
            // which init does when the agent exits.
            tracing::warn!("guest-exec {pid}: cannot start a waiter: {e}");
        }
        lock(&self.state).procs.insert(pid, proc);
        tracing::debug!(pid, path = %a.path, "guest-exec");
        Ok(GuestExec { pid })
    }

    pub(super) fn exec_status(&self, pid: i64) -> Result<GuestExecStatus, QgaError> {
        let proc = lock(&self.state)
            .procs
            .get(&pid)
            .cloned()
            .ok_or_else(|| QgaError::invalid_parameter("pid"))?;
        let mut st = lock(&proc.state);
        let done = st.status.is_some() && st.readers == 0;
        if !done {
            return Ok(GuestExecStatus {
                exited: false,
                ..GuestExecStatus::default()
            });
        }
        let status = st.status.unwrap_or_else(|| ExitStatusExt::from_raw(0));
        let data = |o: &mut Output| {
            o.enabled
                .then(|| base64_encode(&std::mem::take(&mut o.data)))
        };
        let result = GuestExecStatus {
            exited: true,
            exitcode: status.code().map(i64::from),
            signal: status.signal().map(i64::from),
            out_data: data(&mut st.out),
            err_data: data(&mut st.err),
            out_truncated: (st.out.enabled && st.out.truncated).then_some(true),
            err_truncated: (st.err.enabled && st.err.truncated).then_some(true),
        };
        self.captured.fetch_sub(st.held, Ordering::AcqRel);
        st.held = 0;
        drop(st);
        lock(&self.state).procs.remove(&pid);
        Ok(result)
    }
}
