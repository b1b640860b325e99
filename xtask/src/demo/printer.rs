//! The printer device: a PDF printed in the guest lands in the host's spool.

use std::time::Duration;

use anyhow::{anyhow, ensure, Context, Result};
use serde_json::Value;

use super::{ctl, ctl_ok, first_word, sha256_host};
use crate::lab::Lab;

/// A one-page PDF that says `text`, with a correct cross-reference table.
fn tiny_pdf(text: &str) -> Vec<u8> {
    let content = format!("BT /F1 24 Tf 72 720 Td ({text}) Tj ET");
    let objects = [
        "<< /Type /Catalog /Pages 2 0 R >>".to_owned(),
        "<< /Type /Pages /Kids [3 0 R] /Count 1 >>".to_owned(),
        "<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R \
         /Resources << /Font << /F1 5 0 R >> >> >>"
            .to_owned(),
        format!(
            "<< /Length {} >>\nstream\n{content}\nendstream",
            content.len()
        ),
        "<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>".to_owned(),
    ];
    let mut pdf = b"%PDF-1.4\n".to_vec();
    let mut offsets = Vec::new();
    for (i, object) in objects.iter().enumerate() {
        offsets.push(pdf.len());
        pdf.extend_from_slice(format!("{} 0 obj\n{object}\nendobj\n", i + 1).as_bytes());
    }
    let xref = pdf.len();
    pdf.extend_from_slice(
        format!("xref\n0 {}\n0000000000 65535 f \n", objects.len() + 1).as_bytes(),
    );
    for offset in offsets {
        pdf.extend_from_slice(format!("{offset:010} 00000 n \n").as_bytes());
    }
    pdf.extend_from_slice(
        format!(
            "trailer\n<< /Size {} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n",
            objects.len() + 1
        )
        .as_bytes(),
    );
    pdf
}

pub(super) fn demo(lab: &Lab) -> Result<String> {
    let name = lab.name();
    let pdf = tiny_pdf("Hello from the vstream demo");
    let mut out = String::new();
    // The PDF goes into the guest on the command's stdin, then busybox nc prints it.
    let script = "cat > /tmp/demo.pdf && nc 127.0.0.1 9100 < /tmp/demo.pdf; echo nc-rc=$?; \
                  sha256sum /tmp/demo.pdf";
    let printed = ctl(
        lab,
        &["exec", name, "--", "sh", "-c", script],
        &pdf,
        Duration::from_secs(90),
    )?;
    let stdout = String::from_utf8_lossy(&printed.stdout).into_owned();
    ensure!(
        printed.status.success() && stdout.contains("nc-rc=0"),
        "printing with nc in the guest: {stdout} {}",
        String::from_utf8_lossy(&printed.stderr)
    );
    out.push_str(&format!(
        "guest: nc 127.0.0.1 9100 < /tmp/demo.pdf ({} bytes) -> {}",
        pdf.len(),
        stdout.lines().next().unwrap_or_default()
    ));
    out.push('\n');
    let guest_sum = stdout
        .lines()
        .find(|l| l.contains("/tmp/demo.pdf"))
        .map(first_word)
        .transpose()?
        .unwrap_or_default();

    let jobs: Value = serde_json::from_str(&ctl_ok(lab, &["jobs", name, "--json"])?)
        .context("vstreamctl jobs --json")?;
    let job = jobs
        .as_array()
        .and_then(|j| j.iter().rev().find(|j| j["size"] == pdf.len()))
        .cloned()
        .ok_or_else(|| anyhow!("no job of {} bytes in {jobs}", pdf.len()))?;
    ensure!(
        job["state"] == "done" && job["type"] == "pdf",
        "the job is not a finished PDF: {job}"
    );
    let file = job["file"]
        .as_str()
        .ok_or_else(|| anyhow!("job without a file: {job}"))?;
    let spooled = lab.paths().state_dir.join(name).join("spool").join(file);
    let data = std::fs::read(&spooled).with_context(|| format!("reading {}", spooled.display()))?;
    ensure!(
        data == pdf,
        "{} differs from the PDF printed ({} bytes vs {})",
        spooled.display(),
        data.len(),
        pdf.len()
    );
    let host_sum = sha256_host(Some(&spooled), &[])?;
    ensure!(
        host_sum == guest_sum,
        "SHA-256 in the guest {guest_sum}, in the spool {host_sum}"
    );
    out.push_str(&format!("$ vstreamctl jobs {name}\n"));
    out.push_str(&ctl_ok(lab, &["jobs", name])?);
    out.push_str(&format!(
        "spool: {} is byte-identical to the guest's file (sha256 {})\n",
        spooled.display(),
        &host_sum[..16]
    ));
    Ok(out)
}
