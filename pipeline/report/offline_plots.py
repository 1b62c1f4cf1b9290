"""``dvc plots show`` pages that render without a network.

DVC's page (dvc_render) loads Vega, Vega-Lite and vega-embed from a CDN, so offline its charts
are blank. DVC accepts our own page template (``--html-template``, or the ``plots.html_template``
config): a template with a ``{plot_divs}`` placeholder and no ``{scripts}`` one gets DVC's chart
``<div>``s but not its CDN ``<script>`` tags. We fill the template's head with the three
libraries inlined, taken from the installed ``vl-convert-python`` wheel (which ships them for
its own offline rendering), so the page is one file that needs nothing else.

Image plots (PNG/SVG, e.g. the report's ``plots/*.png``) need no JavaScript: DVC copies them
next to the page and links them.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Optional, Sequence

from pipeline.errors import FmpipeError

# DVC's built-in templates are written for Vega-Lite 5; the newest 5.x that vl-convert ships.
VEGA_LITE_VERSION = "5.21"
# Kept in .dvc/tmp (git-ignored, per checkout): 0.9 MB of JavaScript does not belong in git.
TEMPLATE_IN_DVC_DIR = "tmp/fmpipe-offline-plots.html"

_PAGE = """<!DOCTYPE html>
<html>
<head>
<meta charset="utf-8">
{refresh_tag}
<title>DVC plots (offline)</title>
<script type="text/javascript">
/* Vega __VEGA__, Vega-Lite __VL__, vega-embed __EMBED__, bundled by vl-convert-python __VLC__ */
__BUNDLE__
</script>
<style>
body { font-family: system-ui, sans-serif; }
table { border-spacing: 15px; }
img { max-width: 100%; }
</style>
</head>
<body>
{plot_divs}
</body>
</html>
"""


def offline_template() -> str:
    """The HTML template with the Vega libraries inlined (about 0.9 MB)."""
    try:
        import vl_convert as vlc
    except ImportError:  # a broken install, not a user error; still one line
        raise FmpipeError("vl-convert-python is not installed (pip install vl-convert-python); "
                          "it supplies the Vega JavaScript for offline plots") from None
    from importlib.metadata import version

    bundle = vlc.javascript_bundle(vl_version=VEGA_LITE_VERSION)
    # The bundle sits inside <script>: a literal "</script" in a string would end it early,
    # and DVC fills placeholders by plain text replacement, so none may appear in it.
    bundle = bundle.replace("</script", "<\\/script")
    for placeholder in ("{plot_divs}", "{scripts}", "{refresh_tag}"):
        if placeholder in bundle:
            raise FmpipeError(f"vl-convert's JavaScript bundle contains DVC's placeholder {placeholder}; "
                              "cannot build an offline template")
    return (_PAGE.replace("__VEGA__", vlc.get_vega_version())
            .replace("__VL__", VEGA_LITE_VERSION)
            .replace("__EMBED__", vlc.get_vega_embed_version())
            .replace("__VLC__", version("vl-convert-python"))
            .replace("__BUNDLE__", bundle))


def write_template(path: str | Path) -> Path:
    from pipeline.io import atomic_write_text

    path = Path(path)
    atomic_write_text(path, offline_template())
    return path


def _dvc_dir(repo: Path) -> Path:
    d = repo / ".dvc"
    if not d.is_dir():
        raise FmpipeError(f"{repo.resolve()}: not a DVC project (no .dvc/ folder); run this from the project root")
    return d


def show(targets: Sequence[str] = (), out: Optional[str] = None, repo: str | Path = ".",
         extra: Sequence[str] = ()) -> Path:
    """``dvc plots show`` with the offline template; return the page's path."""
    repo = Path(repo)
    template = write_template(_dvc_dir(repo) / TEMPLATE_IN_DVC_DIR)
    cmd = [sys.executable, "-m", "dvc", "plots", "show", "--html-template", str(template.resolve())]
    if out:
        cmd += ["-o", out]
    cmd += [*extra, *targets]
    done = subprocess.run(cmd, cwd=repo, capture_output=True, text=True)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        raise FmpipeError(f"dvc plots show failed (exit {done.returncode}): {tail[0]}")
    return repo / (out or "dvc_plots") / "index.html"


def install(repo: str | Path = ".") -> Path:
    """Write the template into .dvc/tmp and point this checkout's DVC config at it.

    Afterwards plain ``dvc plots show`` / ``dvc plots diff`` produce offline pages too. The
    setting goes to ``.dvc/config.local`` (not committed): another clone decides for itself.
    """
    repo = Path(repo)
    template = write_template(_dvc_dir(repo) / TEMPLATE_IN_DVC_DIR)
    done = subprocess.run([sys.executable, "-m", "dvc", "config", "--local", "plots.html_template",
                           TEMPLATE_IN_DVC_DIR], cwd=repo, capture_output=True, text=True)
    if done.returncode != 0:
        raise FmpipeError(f"dvc config --local plots.html_template failed: {done.stderr.strip()}")
    return template
