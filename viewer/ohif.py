"""The OHIF viewer (npm `@ohif/app`, its prebuilt `dist/`) served by Orthanc's ServeFolders plugin.

One origin for the viewer and the data: Orthanc serves the built viewer under `/<mount>/` and DICOMweb under
`/dicom-web/`, so the viewer's app-config.js names the DICOMweb root by a relative URL and no CORS headers
are needed (Orthanc 1.10 sends none).

The published dist/ is built for the root of a web server (`window.PUBLIC_URL="/"` in index.html, webpack's
public path `"/"` in the bundles, `url(/...)` in the CSS). `ensure_viewer` rebases those absolute paths onto
`/<mount>/` and writes app-config.js (routerBasename `/<mount>`, one DICOMweb data source).

ServeFolders maps a URL to a file and has no single-page-application fallback (a path that is not a file is
a 404), and it takes a file's MIME type from the text after the last dot of its whole path (a folder named
`.cache` makes an extension-less file `application/octet-stream`). OHIF opens a study at the route
`/<mode>/<data source>` (its `buildModeRoutes`), so the data source is named `DATA_SOURCE` ("orthanc.html")
and a copy of index.html lies at `<mode>/orthanc.html` for each mode opened here: the study URL
`/viewer/viewer/orthanc.html?StudyInstanceUIDs=...` is then a real HTML file that boots the app at that
route. OHIF's study list (route `/`) is not served: Orthanc Explorer (`/app/explorer.html`) lists studies.

    dist = ensure_viewer(cache)                     # npm pack once, cached by viewer/ohif.json
    config["ServeFolders"] = orthanc_settings(dist)["ServeFolders"]   # see orthanc_settings
    study_url("http://127.0.0.1:8042", study_uid)   # the page a person opens
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import re
import shutil
import subprocess
import tarfile
import tempfile
import time
from pathlib import Path
from urllib.parse import urlencode

from wholebody.atomic import atomic_path, atomic_write_bytes

log = logging.getLogger(__name__)

PIN = Path(__file__).resolve().parent / "ohif.json"  # package, version and sha512 of the npm tarball
SERVE_FOLDERS_PLUGIN = "/usr/share/orthanc/plugins/libServeFolders.so"  # Debian orthanc 1.10
DICOMWEB_ROOT = "/dicom-web"  # Orthanc's DICOMweb plugin's "Root" (tests/orthanc.py configures the same)
WADO_URI_ROOT = "/wado"  # the DICOMweb plugin's default WADO-URI root
DATA_SOURCE = "orthanc.html"  # OHIF data source name = the file name of the route's index.html copy
MODES = ("viewer", "segmentation")  # OHIF 3.13's basic viewer and segmentation modes (their routeName)
LAYOUT = 1  # bump when the rebasing below changes, so that a cached viewer is remade
NPM_HINT = "it needs npm (Node.js 20: make clinical-tools) and the npm registry"


class ViewerError(RuntimeError):
    """The viewer cannot be installed or served; the message is one line naming what to do."""


def pin() -> dict[str, str]:
    """The pinned npm package: {"package", "version", "integrity" (sha512-<base64>), "license"}."""
    return json.loads(PIN.read_text())


def _check_mount(mount: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9_-]+", mount):
        raise ViewerError(f"mount {mount!r} must be one URL path segment (letters, digits, - and _), e.g. 'viewer'")
    return mount


def app_config(mount: str = "viewer") -> str:
    """The app-config.js text: OHIF at `/<mount>` reading Orthanc's DICOMweb of the same origin.

    SEG display comes with the default app: its modes (`viewer`, `segmentation`) include OHIF's
    cornerstone-dicom-seg extension, whose SOP class handler opens Segmentation Storage and Label Map
    Segmentation Storage. Field names follow OHIF 3.13's dist/app-config.js and its Orthanc example.
    """
    _check_mount(mount)
    config = {
        "name": "wholebody-ct-triton: OHIF on Orthanc",
        "routerBasename": f"/{mount}",
        "extensions": [],
        "modes": [],
        "customizationService": {},
        "showStudyList": False,  # route "/" is not served (module docstring)
        "maxNumberOfWebWorkers": 3,
        "showWarningMessageForCrossOrigin": False,  # same origin
        "showCPUFallbackMessage": True,
        "showLoadingIndicator": True,
        "strictZSpacingForVolumeViewport": True,
        "investigationalUseDialog": {"option": "never"},
        "maxNumRequests": {"interaction": 100, "thumbnail": 5, "prefetch": 10},
        "defaultDataSourceName": DATA_SOURCE,
        "dataSources": [{
            "namespace": "@ohif/extension-default.dataSourcesModule.dicomweb",
            "sourceName": DATA_SOURCE,
            "configuration": {
                "friendlyName": "Orthanc (same origin)", "name": "orthanc",
                "wadoUriRoot": WADO_URI_ROOT, "qidoRoot": DICOMWEB_ROOT, "wadoRoot": DICOMWEB_ROOT,
                "qidoSupportsIncludeField": False, "supportsReject": False, "dicomUploadEnabled": False,
                "imageRendering": "wadors", "thumbnailRendering": "wadors", "enableStudyLazyLoad": True,
                "supportsFuzzyMatching": False, "supportsWildcard": True,
                "omitQuotationForMultipartRequest": True, "bulkDataURI": {"enabled": True},
            },
        }],
    }
    return "/** @type {AppTypes.Config} */\n// written by viewer/ohif.py (app_config)\nwindow.config = " + \
        json.dumps(config, indent=2) + ";\n"


def cache_key(mount: str = "viewer") -> str:
    """Folder name of a viewer built from viewer/ohif.json for `mount`: version + a digest of the pin, the
    mount, the app-config and LAYOUT (any change makes a new folder)."""
    p = pin()
    digest = hashlib.sha256("\0".join([PIN.read_text(), mount, app_config(mount), str(LAYOUT)]).encode())
    return f"app-{p['version']}-{mount}-{digest.hexdigest()[:12]}"


def _npm() -> str:
    npm = shutil.which("npm")
    if npm is None:
        raise ViewerError(f"npm is not installed: {NPM_HINT}")
    return npm


def _fetch_tarball(folder: Path) -> Path:
    """`npm pack` the pinned package into `folder` (npm's cache makes a second fetch local) and check its
    sha512 against viewer/ohif.json. Only the tarball: its prebuilt dist/ needs none of its dependencies
    (and `npm install @ohif/app@3.13.2` fails: the registry has no @ohif/i18n@3.13.2 it names)."""
    p = pin()
    done = subprocess.run([_npm(), "pack", f"{p['package']}@{p['version']}", "--json", "--pack-destination",
                           str(folder), "--loglevel=error"], capture_output=True, text=True, timeout=1800, check=False)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise ViewerError(f"npm pack {p['package']}@{p['version']} failed ({last}); {NPM_HINT}")
    tarball = folder / json.loads(done.stdout)[0]["filename"]
    algorithm, _, expected = p["integrity"].partition("-")
    got = base64.b64encode(hashlib.new(algorithm, tarball.read_bytes()).digest()).decode()
    if got != expected:
        raise ViewerError(f"{tarball.name}: {algorithm} {got} is not viewer/ohif.json's {expected}; "
                          "the registry served another file: check viewer/ohif.json and the registry")
    return tarball


def _replace(path: Path, old: str, new: str, at_least: int) -> None:
    """Replace every `old` by `new` in the text file `path` (atomically); ViewerError if fewer than `at_least`."""
    text = path.read_text()
    count = text.count(old)
    if count < at_least:
        raise ViewerError(f"{path.name} of @ohif/app has {count} x {old!r} (expected >= {at_least}): this build "
                          "differs from the one viewer/ohif.py rebases; pin the version in viewer/ohif.json it knows")
    if count:
        atomic_write_bytes(path, text.replace(old, new))


def rebase(dist: Path, mount: str) -> None:
    """Move a dist/ built for `/` onto `/<mount>/`: index.html's PUBLIC_URL and root-absolute src/href/content,
    webpack's public path in the bundles (chunks, workers, wasm, images) and url(/...) in the CSS; then write
    app-config.js and index.html's copies at `<mode>/DATA_SOURCE`. Raises ViewerError for another layout."""
    prefix = f"/{_check_mount(mount)}/"
    index = dist / "index.html"
    _replace(index, 'window.PUBLIC_URL="/"', f'window.PUBLIC_URL="{prefix}"', at_least=1)
    for attribute in ("src", "href", "content"):
        _replace(index, f'{attribute}="/', f'{attribute}="{prefix}', at_least=1 if attribute != "content" else 0)
    app_bundles = sorted(dist.glob("app.bundle.*.js"))
    if len(app_bundles) != 1:
        raise ViewerError(f"{dist} has {len(app_bundles)} app.bundle.*.js (expected 1): this build of @ohif/app "
                          "differs from the one viewer/ohif.py rebases; pin the version in viewer/ohif.json it knows")
    _replace(app_bundles[0], '__webpack_require__.p = "/";', f'__webpack_require__.p = "{prefix}";', at_least=1)
    for bundle in dist.glob("*.js"):
        if not bundle.name.startswith("app.bundle."):
            _replace(bundle, '__webpack_require__.p = "/";', f'__webpack_require__.p = "{prefix}";', at_least=0)
    for css in dist.glob("*.css"):
        _replace(css, "url(/", f"url({prefix}", at_least=0)
    atomic_write_bytes(dist / "app-config.js", app_config(mount))
    for mode in MODES:
        (dist / mode).mkdir(exist_ok=True)
        shutil.copy2(index, dist / mode / DATA_SOURCE)


def ensure_viewer(cache: Path, mount: str = "viewer") -> Path:
    """The built OHIF viewer for `/<mount>/`: `<cache>/ohif/<cache_key>/dist` (about 200 MB), made once.

    The first call packs the pinned @ohif/app (viewer/ohif.json: `npm pack`, sha512 checked, ~50 MB from
    the npm registry), extracts its dist/, rebases it onto `/<mount>/` and writes app-config.js
    (`app_config`), all in a temporary folder renamed into place when complete (wholebody.atomic): a reader
    sees no folder or a whole one, and an interrupted call leaves nothing. Later calls return the folder.
    Raises ViewerError (npm missing, registry unreachable, a tarball of another digest or layout).
    """
    _check_mount(mount)
    target = Path(cache) / "ohif" / cache_key(mount)
    dist = target / "dist"
    if (dist / "app-config.js").is_file():
        return dist
    target.parent.mkdir(parents=True, exist_ok=True)
    p = pin()
    log.info("installing %s %s into %s", p["package"], p["version"], target)
    try:
        with tempfile.TemporaryDirectory(dir=target.parent, prefix=".pack-") as tmp, \
                atomic_path(target, directory=True) as partial:
            tarball = _fetch_tarball(Path(tmp))
            with tarfile.open(tarball) as tar:
                members = [m for m in tar.getmembers() if m.name.startswith("package/dist/")]
                if not members:
                    raise ViewerError(f"{tarball.name} has no package/dist/: pin a version of @ohif/app that "
                                      "ships its built viewer in viewer/ohif.json")
                if hasattr(tarfile, "data_filter"):  # Python >= 3.10.12 / 3.11.4: no links or paths outside
                    tar.extractall(tmp, members=members, filter="data")
                else:
                    if any(m.issym() or m.islnk() or ".." in Path(m.name).parts for m in members):
                        raise ViewerError(f"{tarball.name} has links or '..' paths: not extracted")
                    tar.extractall(tmp, members=members)
            shutil.move(Path(tmp) / "package" / "dist", partial / "dist")
            (partial / "ohif.json").write_text(PIN.read_text())
            rebase(partial / "dist", mount)
    except OSError:
        if (dist / "app-config.js").is_file():  # another process finished the same folder first
            return dist
        raise
    return dist


def built_mount(dist: Path) -> str:
    """The mount a dist/ of `ensure_viewer` was built for (its app-config's routerBasename)."""
    found = re.search(r'"routerBasename": "/([^"]+)"', (Path(dist) / "app-config.js").read_text())
    if found is None:
        raise ViewerError(f"{dist}/app-config.js has no routerBasename: make the folder with viewer.ensure_viewer")
    return found.group(1)


def orthanc_settings(dist: Path, mount: str = "viewer") -> dict:
    """The Orthanc configuration fragment that serves `dist` at `/<mount>/`:
    {"Plugins": [libServeFolders.so], "ServeFolders": {"Folders": {"/<mount>": dist}, ...}}.

    Merge it into an Orthanc configuration that also loads the DICOMweb plugin with Root "/dicom-web/"
    (append to its "Plugins" list; tests/orthanc.py's `extra_config` does). ServeFolders' own caching
    headers are kept off (AllowCache false: a remade viewer is seen at once). Raises ViewerError when the
    plugin is missing or `dist` was built for another mount.
    """
    _check_mount(mount)
    if not Path(SERVE_FOLDERS_PLUGIN).is_file():
        raise ViewerError(f"{SERVE_FOLDERS_PLUGIN} is missing: install Debian's orthanc (make clinical-tools)")
    if built_mount(dist) != mount:
        raise ViewerError(f"{dist} was built for /{built_mount(dist)}/, not /{mount}/: "
                          f"call ensure_viewer(cache, mount={mount!r})")
    return {"Plugins": [SERVE_FOLDERS_PLUGIN],
            "ServeFolders": {"Folders": {f"/{mount}": str(Path(dist).resolve())},
                             "AllowCache": False, "GenerateETag": True}}


def study_url(orthanc_url: str, study_uid: str, mount: str = "viewer", mode: str = "viewer",
              series_uid: str | None = None) -> str:
    """The OHIF URL that opens `study_uid` from Orthanc at `orthanc_url` (e.g. http://127.0.0.1:8042):
    `<orthanc_url>/<mount>/<mode>/orthanc.html?StudyInstanceUIDs=<uid>`; with `series_uid` (a SEG's
    series, say) OHIF shows that series first (its initialSeriesInstanceUID parameter)."""
    if mode not in MODES:
        raise ViewerError(f"mode {mode!r} is not served; choose one of {', '.join(MODES)}")
    query = {"StudyInstanceUIDs": study_uid}
    if series_uid:
        query["initialSeriesInstanceUID"] = series_uid
    return f"{orthanc_url.rstrip('/')}/{_check_mount(mount)}/{mode}/{DATA_SOURCE}?{urlencode(query)}"


# -- what a person sees: the study opened in headless Chromium -------------------------------------------

HYDRATE_PROMPT = "Do you want to open this Segmentation?"  # OHIF 3.13's question when a SEG is shown first
_CLICK_YES = ("(() => { const b = [...document.querySelectorAll('button')].find(e => e.innerText.trim() === 'Yes');"
              " if (b) b.click(); return !!b; })()")
_SEGMENT_ROWS = ("[...document.querySelectorAll('[data-cy=data-row-title]')].map(e => "
                 "[e.innerText.trim(), e.closest('[data-cy=data-row-title]').parentElement.parentElement"
                 ".querySelector('[data-cy=data-row-colorhex]')?.style.backgroundColor || ''])")


def capture(url: str, screenshot: Path, timeout_s: float = 600.0, width: int = 1600, height: int = 1000,
            timings: dict[str, float] | None = None) -> list[tuple[str, str]]:
    """Open `url` (a `study_url`, with `series_uid` = a SEG's series) in headless Chromium, answer OHIF's
    "open this Segmentation?" with Yes, open the segmentation panel, wait until it lists segments, and save
    a PNG at `screenshot`. Returns the panel's rows: (segment label, CSS colour "rgb(r, g, b)"), in order.

    timeout_s: for each stage (the app booting, the SEG loading, the panel filling): OHIF on a loaded
    2-core box takes about 30 s to the prompt. timings: if given, filled with the seconds from the start of
    Chromium to "browser" (its debugging port open), "prompt" (the SEG drawn over the CT, OHIF asking) and
    "panel" (the segment list shown), for perf/viewer_load.py. Raises viewer.chromium.BrowserError when a
    stage times out.
    """
    from viewer.chromium import HeadlessChromium

    start = time.perf_counter()
    stages = timings if timings is not None else {}
    with HeadlessChromium(width=width, height=height) as browser:
        stages["browser"] = time.perf_counter() - start
        browser.open(url)
        browser.wait_for(f"document.body && document.body.innerText.includes({json.dumps(HYDRATE_PROMPT)})",
                         timeout_s)
        stages["prompt"] = time.perf_counter() - start
        browser.wait_for(_CLICK_YES, timeout_s)
        browser.wait_for("(() => { const b = document.querySelector('[data-cy=panelSegmentation-btn]');"
                         " if (b) b.click(); return !!b; })()", timeout_s)
        rows = browser.wait_for(f"(() => {{ const r = {_SEGMENT_ROWS}; return r.length ? r : null; }})()",
                                timeout_s)
        browser.wait_for(f"!document.body.innerText.includes({json.dumps(HYDRATE_PROMPT)})", timeout_s)
        stages["panel"] = time.perf_counter() - start
        time.sleep(2)  # the last render of the viewport after the panel opened
        browser.screenshot(screenshot)
        log.info("%s: %d segment rows, screenshot %s", url, len(rows), screenshot)
        return [(str(name), str(color)) for name, color in rows]
