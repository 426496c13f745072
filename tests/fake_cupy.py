"""A counting stand-in for CuPy, for tests of the host path on machines without a GPU.

``FakeCupy().module`` goes into ``sys.modules["cupy"]``. Its arrays wrap NumPy arrays (the
class is named ``cupy.ndarray``, so the package takes them for CuPy arrays) and every call
that costs a GPU user time outside the kernels is recorded in ``FakeCupy.events`` as
``(kind, detail)``:

- ``alloc``: a new device array (``empty``, ``zeros``, ``asarray`` of host data, a copying
  ``ascontiguousarray``, ``concatenate``, ``sum``); detail: the array.
- ``memset``: ``zeros``, ``fill``.
- ``broadcast`` / ``concatenate``: ``broadcast_to`` (a view) / ``concatenate`` (also an
  ``alloc``): how an expanded table (SASA's ``rel`` before issue 10) is built; detail: the array.
- ``h2d`` / ``d2h``: host-to-device / device-to-host copies (``asarray`` of a NumPy array;
  ``get``, ``asnumpy``, ``__array__``, ``item``, ``float()``/``int()``/``bool()`` of an array).
- ``sync``: stream or device synchronisation.
- ``device_query``: device count, properties, attributes, compute capability.
- ``current_device``: a read of the current device (``Device()``, ``runtime.getDevice``).
- ``device_enter``: ``with Device(i)`` (a read and maybe a switch of the current device).
- ``compile``: a ``RawModule`` built; ``get_function``: a kernel looked up in one.
- ``launch``: a kernel launch; detail: the kernel's name. Kernels are NOT executed (their
  values are tested on the ``sim`` backend): outputs hold whatever ``empty`` left.

Anything the fake does not implement is an ``AttributeError``, so new CuPy calls on the host
path cannot slip in uncounted. A launch checks its arguments as CuPy would need them: grid
and block tuples, arrays of the current device, NumPy scalars (the kernels' parameter types).
"""
from __future__ import annotations

import types
from collections import Counter

import numpy as np


class FakeCupy:
    def __init__(self, devices: int = 1, version: str = "14.0.0"):
        self.events: list[tuple[str, object]] = []
        self.devices = devices
        self.current = 0
        self.smem_optin = 227 * 1024   # cudaDevAttrMaxSharedMemoryPerBlockOptin (sm_90)
        self.functions: dict = {}      # kernel name -> its Function (the last one handed out)
        self.module = self._build(version)

    # -- bookkeeping -------------------------------------------------------------------
    def record(self, kind: str, detail=None):
        self.events.append((kind, detail))

    def counts(self) -> Counter:
        return Counter(kind for kind, _ in self.events)

    def details(self, kind: str) -> list:
        return [d for k, d in self.events if k == kind]

    def reset(self):
        self.events.clear()

    def array(self, host: np.ndarray, device: int = 0):
        """A device array holding ``host``'s values (not recorded: test inputs)."""
        return self.module.ndarray(np.array(host), device)

    # -- the module --------------------------------------------------------------------
    def _build(self, version: str):
        fake = self

        class ndarray:   # noqa: N801 - CuPy's name; the package recognises "cupy" arrays by it
            def __init__(self, a: np.ndarray, device: int):
                self._a, self._device = a, device

            shape = property(lambda self: self._a.shape)
            dtype = property(lambda self: self._a.dtype)
            ndim = property(lambda self: self._a.ndim)
            size = property(lambda self: self._a.size)
            itemsize = property(lambda self: self._a.itemsize)
            nbytes = property(lambda self: self._a.nbytes)
            strides = property(lambda self: self._a.strides)
            flags = property(lambda self: self._a.flags)

            @property
            def device(self):
                return Device(self._device)

            def __len__(self):
                return len(self._a)

            def __getitem__(self, index):        # a view: no allocation
                return ndarray(self._a[index], self._device)

            def sum(self, axis=None):
                return _new(self._a.sum(axis=axis), self._device)

            def fill(self, value):
                fake.record("memset", self)
                self._a.fill(value)

            def get(self):
                fake.record("d2h", self)
                return np.array(self._a)

            def __array__(self, dtype=None, copy=None):
                fake.record("d2h", self)
                return np.asarray(self._a, dtype)

            def item(self):
                fake.record("d2h", self)
                return self._a.item()

            def __float__(self):
                return float(self.item())

            def __int__(self):
                return int(self.item())

            def __bool__(self):
                return bool(self.item())

        ndarray.__module__ = "cupy"

        def _new(a: np.ndarray, device=None):
            out = ndarray(np.ascontiguousarray(a), fake.current if device is None else device)
            fake.record("alloc", out)
            return out

        def empty(shape, dtype=float):
            return _new(np.empty(shape, dtype))

        def zeros(shape, dtype=float):
            out = _new(np.zeros(shape, dtype))
            fake.record("memset", out)
            return out

        def asarray(x, dtype=None):
            if isinstance(x, ndarray) and (dtype is None or np.dtype(dtype) == x.dtype):
                return x
            if isinstance(x, ndarray):
                return _new(x._a.astype(dtype))
            fake.record("h2d", x)
            return _new(np.asarray(x, dtype))

        def ascontiguousarray(x):
            if x._a.flags.c_contiguous:
                return x
            return _new(x._a, x._device)

        def broadcast_to(x, shape):              # a view
            out = ndarray(np.broadcast_to(x._a, shape), x._device)
            fake.record("broadcast", out)
            return out

        def concatenate(arrays, axis=0):
            out = _new(np.concatenate([a._a for a in arrays], axis=axis), arrays[0]._device)
            fake.record("concatenate", out)
            return out

        def asnumpy(x):
            fake.record("d2h", x)
            return np.array(x._a)

        class Device:
            def __init__(self, device=None):
                if device is None:
                    fake.record("current_device")
                    device = fake.current
                self.id = int(device)
                self._outer = []

            def __enter__(self):
                fake.record("device_enter", self.id)
                self._outer.append(fake.current)
                fake.current = self.id
                return self

            def __exit__(self, *exc):
                fake.current = self._outer.pop()

            def synchronize(self):
                fake.record("sync", "device")

            @property
            def compute_capability(self):
                fake.record("device_query", "compute_capability")
                return "90"

        class Stream:
            def synchronize(self):
                fake.record("sync", "stream")

        def query(name, value):
            def call(*args):
                fake.record("device_query", name)
                return value(*args)
            return call

        def get_device():
            fake.record("current_device")
            return fake.current

        def device_synchronize():
            fake.record("sync", "runtime")

        class Function:
            def __init__(self, name):
                self.name = name
                self.max_dynamic_shared_size_bytes = 48 * 1024   # raised by cudaFuncSetAttribute

            def __call__(self, grid, block, args, shared_mem=0):
                for what, dims in (("grid", grid), ("block", block)):
                    assert isinstance(dims, tuple) and 1 <= len(dims) <= 3, (self.name, what, dims)
                    assert all(isinstance(d, int) and d >= 1 for d in dims), (self.name, what, dims)
                assert isinstance(args, tuple), self.name
                for i, a in enumerate(args):
                    if isinstance(a, ndarray):
                        assert a._device == fake.current, f"{self.name}: argument {i} on another device"
                        assert a._a.flags.c_contiguous, f"{self.name}: argument {i} not contiguous"
                    else:
                        assert isinstance(a, np.generic), \
                            f"{self.name}: argument {i} is a {type(a).__name__}, not a NumPy scalar"
                assert 0 <= shared_mem <= self.max_dynamic_shared_size_bytes, (self.name, shared_mem)
                fake.record("launch", self.name)

        class RawModule:
            def __init__(self, code, options=(), name_expressions=None):
                fake.record("compile", name_expressions)
                self.names = tuple(name_expressions or ())

            def compile(self):
                pass

            def get_function(self, name):
                fake.record("get_function", name)
                if name not in self.names:
                    raise KeyError(f"no kernel {name!r} among the module's name expressions")
                fake.functions[name] = Function(name)
                return fake.functions[name]

        runtime = types.SimpleNamespace(
            getDeviceCount=query("getDeviceCount", lambda: fake.devices),
            getDeviceProperties=query("getDeviceProperties", lambda d: {"name": b"fake GPU"}),
            deviceGetAttribute=query("deviceGetAttribute", lambda attr, d: fake.smem_optin if attr == 97 else 0),
            getDevice=get_device, deviceSynchronize=device_synchronize)
        cuda = types.SimpleNamespace(
            Device=Device, runtime=runtime, get_current_stream=lambda: Stream(),
            get_cuda_path=lambda: None)
        module = types.ModuleType("cupy")
        module.__dict__.update(
            __version__=version, ndarray=ndarray, cuda=cuda, RawModule=RawModule, empty=empty,
            zeros=zeros, asarray=asarray, ascontiguousarray=ascontiguousarray,
            broadcast_to=broadcast_to, concatenate=concatenate, asnumpy=asnumpy)
        return module
