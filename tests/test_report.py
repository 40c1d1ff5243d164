"""The report of a run folder, read as a reader would: in headless Chromium (Debian package
``chromium``; skipped when absent) every image loads and every linked file exists."""

import json
import os
import re
import shutil
import subprocess

import pytest

from chanaxis_fast.cli import main

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

_PROBE = """<script>
window.addEventListener('load', () => {
  const sizes = Array.from(document.images).map(i => [i.getAttribute('src'), i.naturalWidth, i.naturalHeight]);
  const out = document.createElement('pre'); out.id = 'probe'; out.textContent = JSON.stringify(sizes);
  document.body.appendChild(out);
});
</script></body>"""


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "run"
    assert main(["run", "--model", "mnist_cnn", "--data", "mnist", "--images", "200",
                 "--batch-size", "100", "--rank-images", "8", "--ratios", "0.2,0.5",
                 "--eval-images", "200", "--lesion-per-bin", "1", "--lesion-images", "100",
                 "--out", str(out), "--quiet"]) == 0
    return out


def test_the_report_folder_holds_every_file_it_promises(run_folder):
    html = (run_folder / "index.html").read_text()
    md = (run_folder / "report.md").read_text()
    targets = re.findall(r'(?:src|href)="([^"#]+)"', html)
    assert targets and all((run_folder / t).is_file() for t in targets), \
        [t for t in targets if not (run_folder / t).is_file()]
    for png in ("retention.png", "auc.png", "axes.png", "similarity.png", "hull_sizes.png",
                "modularity.png", "lesion.png"):
        assert f"figures/{png}" in targets, png
        assert f"figures/{png}" in md
    for table in ("headline", "sweep_points", "alignment", "hull_statistics", "modularity",
                  "weight_distribution", "lesion_summary", "lesions"):
        assert f"tables/{table}.csv" in targets and (run_folder / "tables" / f"{table}.json").is_file()
    headline = json.loads((run_folder / "tables" / "headline.json").read_text())
    assert {"metric", "auc_before", "rank", "retention_50_before"} <= set(headline[0])
    lesions = json.loads((run_folder / "tables" / "lesions.json").read_text())
    assert lesions and all(r["loss_damage"] is not None for r in lesions)


@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium (Debian package chromium) is not installed")
def test_every_image_loads_in_a_browser(run_folder, tmp_path):
    probe = run_folder / "probe.html"
    probe.write_text((run_folder / "index.html").read_text().replace("</body>", _PROBE))
    try:
        dom = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
                              "--virtual-time-budget=5000", "--dump-dom", probe.as_uri()],
                             capture_output=True, text=True, timeout=120).stdout
    finally:
        probe.unlink()
    found = re.search(r'<pre id="probe">(.*?)</pre>', dom, re.S)
    assert found, dom[-2000:]
    sizes = json.loads(found.group(1).replace("&quot;", '"'))
    assert len(sizes) >= 7
    assert all(w > 0 and h > 0 for _, w, h in sizes), sizes
    shot = tmp_path / "report.png"
    subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={shot}",
                    "--window-size=1200,900", (run_folder / "index.html").as_uri()],
                   capture_output=True, timeout=120)
    assert shot.stat().st_size > 10_000
