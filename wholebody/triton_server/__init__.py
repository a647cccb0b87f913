"""A local Triton Inference Server for the embedded CPU default, the tests and the benchmarks.

    python -m wholebody.triton_server install       # fetch the binaries into the cache
    python -m wholebody.triton_server serve          # serve model_repository/ on CPU until Ctrl-C

One job per module:

- `install`: tritonserver and its Python backend from the `nvidia-pytriton` wheel, into the cache;
- `perf_analyzer`: perf_analyzer from the `tritonclient` wheel of the same release, and its environment;
- `processes`: a server's process group, its CPU time, children that die with the launcher;
- `ports`: free and taken ports, and who holds a listening one;
- `locks`: the operator key and the locked tritonserver command line every server runs;
- `stubs`: the Python backend stubs of a server (model, shared-memory pool), from /proc;
- `regions`: shared-memory regions of clients that exited, reclaimed;
- `watchdog`: reloads a model whose stub died or whose idle stub holds a large pool;
- `local`: `LocalTritonServer`, one tritonserver process group: started, drained, stopped;
- `cli`: `main`, the `install` and `serve` commands (`__main__` runs it).

The names users start from (and the README's) are importable from the package itself; the rest from the
module that owns them.
"""

from __future__ import annotations

from wholebody.triton_server.cli import main
from wholebody.triton_server.install import DEFAULT_CACHE, install_tritonserver
from wholebody.triton_server.local import LocalTritonServer
from wholebody.triton_server.locks import operator_headers, tritonserver_args

__all__ = ["DEFAULT_CACHE", "LocalTritonServer", "install_tritonserver", "main", "operator_headers", "tritonserver_args"]
