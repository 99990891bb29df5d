//! A proxy-wasm host on wasmtime that plays Envoy 1.40 for the built `vmesh_filter.wasm`.
//!
//! A [`Host`] is one Envoy process: a controllable clock, shared data (keyed by `vm_id`, so
//! an agent VM and worker VMs with the same `vm_id` see each other's writes, as in Envoy),
//! stats and the set of clusters. [`Host::vm`] instantiates one VM (one Envoy worker's VM for
//! a `vm_id`); the test then drives its callbacks in Envoy's order —
//! [`Vm::start`] (`proxy_on_context_create(root, 0)` then `proxy_on_vm_start`),
//! [`Vm::configure`], [`Vm::tick`], and [`Vm::add_root`] for more plugins sharing the VM;
//! HTTP streams: [`Vm::create_http_stream`], [`Vm::request_headers`], [`Vm::request_body`],
//! [`Vm::finish_stream`]; network connections: [`Vm::create_connection`] (context create,
//! `proxy_on_new_connection`), [`Vm::downstream_data`], [`Vm::finish_connection`]; callouts:
//! [`Vm::http_call_response`], [`Vm::http_call_reset`] — and asserts on the returned
//! [`Action`]s, the recorded [`HostCall`]s, the [`Stream`] state (what the filter let through,
//! its local reply, a reset) and the [`Connection`] state (what went back to the client, resumes,
//! a close).
//!
//! Host calls follow Envoy's code (proxy-wasm-cpp-host `exports.cc` and `context.cc`, Envoy's
//! wasm `context.cc`, the network `FilterManagerImpl`): statuses, which buffers and maps exist
//! in which callback, buffer copy-in and copy-out through the module's allocator, callouts made
//! on the root context and answered there, deferred stream actions, metric ids, restricted
//! calls during `_initialize`. A network filter's connection ends in Envoy's echo filter, as in
//! vm-sidecar.yaml: whatever the filter leaves in the read buffer and lets through is written
//! back to the client.

mod abi;
mod imports;
mod record;
mod state;
pub mod vmesh;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use wasmtime::{
    Config, Engine, ExternType, Instance, Linker, Module, Store, StoreLimitsBuilder, WasmParams,
    WasmResults,
};

pub use abi::{
    decode_pairs, encode_pairs, Action, BufferType, LogLevel, MapType, MetricType, Pairs, PeerType,
    Status, StreamType,
};
pub use imports::WASI_ALLOWED;
pub use record::{HostCall, HttpCallRequest, HttpResponse, LocalResponse, Recorded, WasiCall};
pub use state::{Connection, GrpcStream, Stat, Stream};

use state::{Context, Deferred, Phase, Process, RootContext, SharedProcess, VmState};

/// Environment variable naming the module to test.
pub const FILTER_WASM_ENV: &str = "VMESH_FILTER_WASM";
const BUILD_HINT: &str =
    "build it with: cargo build --release --target wasm32-wasip1 -p vmesh-filter";
/// Envoy's cap on a VM's linear memory (proxy-wasm-cpp-host `limits.h`).
const MAX_MEMORY: usize = 1024 * 1024 * 1024;

/// Where the filter module is: `$VMESH_FILTER_WASM`, else the workspace's release build.
pub fn filter_wasm_path() -> PathBuf {
    std::env::var_os(FILTER_WASM_ENV)
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../target/wasm32-wasip1/release/vmesh_filter.wasm")
        })
}

struct Compiled {
    engine: Engine,
    module: Module,
    compile_time: Duration,
}

/// The module compiled once per test binary: compiling is the slow part of a VM.
fn compiled() -> &'static Compiled {
    static COMPILED: OnceLock<Compiled> = OnceLock::new();
    COMPILED.get_or_init(|| {
        let path = filter_wasm_path();
        let bytes = std::fs::read(&path).unwrap_or_else(|e| {
            panic!(
                "cannot read the filter module {}: {e}\n{BUILD_HINT}\n\
                 (or set {FILTER_WASM_ENV} to a built vmesh_filter.wasm)",
                path.display()
            )
        });
        warn_if_stale(&path);
        // Cranelift's default (optimizing) settings: the generated code is what the timings
        // printed by the memory test measure.
        let engine = Engine::new(&Config::new()).expect("default wasmtime config");
        let started = Instant::now();
        let module = Module::from_binary(&engine, &bytes)
            .unwrap_or_else(|e| panic!("{} does not compile: {e:?}", path.display()));
        Compiled {
            engine,
            module,
            compile_time: started.elapsed(),
        }
    })
}

/// Says so when filter sources are newer than the module: the tests would test an old build.
fn warn_if_stale(wasm: &Path) {
    let Ok(built) = wasm.metadata().and_then(|m| m.modified()) else {
        return;
    };
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    for dir in ["filter/src", "core/src", "core/src/dns", "core/src/names"] {
        let Ok(entries) = std::fs::read_dir(root.join(dir)) else {
            continue;
        };
        for entry in entries.flatten() {
            let newer = entry
                .metadata()
                .and_then(|m| m.modified())
                .is_ok_and(|t| t > built);
            if newer {
                eprintln!(
                    "warning: {} is newer than {}; {BUILD_HINT}",
                    entry.path().display(),
                    wasm.display()
                );
                return;
            }
        }
    }
}

/// The module's imports as (module, name), in declaration order.
pub fn module_imports() -> Vec<(String, String)> {
    compiled()
        .module
        .imports()
        .map(|i| (i.module().to_string(), i.name().to_string()))
        .collect()
}

/// The module's exported functions.
pub fn module_exported_functions() -> Vec<String> {
    compiled()
        .module
        .exports()
        .filter(|e| matches!(e.ty(), ExternType::Func(_)))
        .map(|e| e.name().to_string())
        .collect()
}

/// How long wasmtime took to compile the module (once per test binary).
pub fn module_compile_time() -> Duration {
    compiled().compile_time
}

/// One Envoy plugin configuration: which VM it runs in and which root it asks for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plugin {
    pub vm_id: String,
    pub root_id: String,
    pub name: String,
    pub configuration: Vec<u8>,
    pub vm_configuration: Vec<u8>,
}

/// Why a callback did not complete. `Debug` prints the readable form, since test functions
/// that return `Result<(), VmError>` report errors with it.
#[derive(Clone, PartialEq, Eq)]
pub enum VmError {
    /// The module trapped (a panic aborts to a trap); Envoy then fails the VM.
    Trap {
        callback: &'static str,
        message: String,
        /// What the SDK's panic hook logged at critical level, if anything.
        panic: Option<String>,
    },
    /// The VM trapped earlier and takes no more calls.
    Failed {
        callback: &'static str,
        first: String,
    },
    /// The host could not set the VM up or find an export.
    Setup(String),
    /// The test answered a callout the module never made (or answered it twice).
    UnknownToken(u32),
}

impl std::fmt::Display for VmError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            VmError::Trap {
                callback,
                message,
                panic,
            } => {
                write!(f, "VM trapped in {callback}: {message}")?;
                if let Some(p) = panic {
                    write!(f, "\n  module panicked: {p}")?;
                }
                Ok(())
            }
            VmError::Failed { callback, first } => {
                write!(f, "{callback} on a failed VM (first failure: {first})")
            }
            VmError::Setup(m) => write!(f, "VM setup: {m}"),
            VmError::UnknownToken(t) => write!(f, "no callout with token {t} is pending"),
        }
    }
}

impl std::fmt::Debug for VmError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

impl std::error::Error for VmError {}

/// One Envoy process: what its VMs share.
#[derive(Debug, Clone)]
pub struct Host {
    process: SharedProcess,
}

impl Default for Host {
    fn default() -> Self {
        Self::new()
    }
}

impl Host {
    pub fn new() -> Self {
        Host {
            process: std::rc::Rc::new(std::cell::RefCell::new(Process::new())),
        }
    }

    /// Makes a cluster exist: `proxy_http_call` to any other is refused (BadArgument).
    pub fn add_cluster(&self, name: &str) {
        self.process.borrow_mut().clusters.insert(name.to_string());
    }

    pub fn now(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_nanos(self.process.borrow().now_ns)
    }

    /// Moves the clock; nothing else happens until the test calls the VMs.
    pub fn advance(&self, by: Duration) {
        let mut p = self.process.borrow_mut();
        p.now_ns = p.now_ns.saturating_add(by.as_nanos() as u64);
    }

    pub fn set_log_level(&self, level: LogLevel) {
        self.process.borrow_mut().log_level = level;
    }

    /// Shared data value and cas, as every VM with this `vm_id` sees it.
    pub fn shared_data(&self, vm_id: &str, key: &str) -> Option<(Vec<u8>, u32)> {
        self.process
            .borrow()
            .shared
            .get(&(vm_id.to_string(), key.to_string()))
            .cloned()
    }

    /// Writes shared data as another VM would (unconditionally).
    pub fn set_shared_data(&self, vm_id: &str, key: &str, value: &[u8]) {
        self.process
            .borrow_mut()
            .set_shared(vm_id, key, value.to_vec(), 0);
    }

    /// A stat by the name the module defined it with (Envoy shows it as `wasmcustom.<name>`).
    pub fn stat(&self, name: &str) -> Option<Stat> {
        self.process.borrow().stats.get(name).cloned()
    }

    /// The value of a counter or gauge; 0 when it was never defined.
    pub fn stat_value(&self, name: &str) -> u64 {
        self.stat(name).map(|s| s.value).unwrap_or(0)
    }

    /// Instantiates the module and runs `_initialize`, as Envoy does when it creates a VM.
    pub fn vm(&self, plugin: Plugin) -> Result<Vm, VmError> {
        let compiled = compiled();
        let mut linker = Linker::new(&compiled.engine);
        imports::define(&mut linker, &compiled.engine)
            .map_err(|e| VmError::Setup(format!("defining host functions: {e}")))?;
        let limits = StoreLimitsBuilder::new().memory_size(MAX_MEMORY).build();
        let state = VmState::new(self.process.clone(), plugin, limits);
        let mut store = Store::new(&compiled.engine, state);
        store.limiter(|s| &mut s.limits);
        let instance = linker
            .instantiate(&mut store, &compiled.module)
            .map_err(|e| VmError::Setup(format!("instantiating: {e}")))?;
        let memory = instance
            .get_memory(&mut store, "memory")
            .ok_or_else(|| VmError::Setup("the module exports no memory".into()))?;
        // Envoy prefers `malloc` and falls back to `proxy_on_memory_allocate`.
        let malloc = instance
            .get_typed_func::<i32, i32>(&mut store, "malloc")
            .or_else(|_| {
                instance.get_typed_func::<i32, i32>(&mut store, "proxy_on_memory_allocate")
            })
            .map_err(|_| VmError::Setup("Wasm module is missing malloc function.".into()))?;
        store.data_mut().memory = Some(memory);
        store.data_mut().malloc = Some(malloc);
        let mut vm = Vm {
            store,
            instance,
            failed: None,
            root: 0,
        };
        vm.store.data_mut().phase = Phase::Initialize;
        let started = if vm.has_export("_initialize") {
            vm.call::<(), ()>("_initialize", 0, ()).and_then(|()| {
                if vm.has_export("main") {
                    vm.call::<(i32, i32), i32>("main", 0, (0, 0)).map(drop)
                } else if vm.has_export("__main_void") {
                    vm.call::<(), i32>("__main_void", 0, ()).map(drop)
                } else {
                    Ok(())
                }
            })
        } else if vm.has_export("_start") {
            vm.call::<(), ()>("_start", 0, ())
        } else {
            Ok(())
        };
        vm.store.data_mut().phase = Phase::Normal;
        started.map(|()| vm)
    }
}

/// One VM instance of the module (one Envoy worker's VM for a `vm_id`, serving one or more
/// plugins).
pub struct Vm {
    store: Store<VmState>,
    instance: Instance,
    failed: Option<String>,
    root: u32,
}

impl std::fmt::Debug for Vm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vm")
            .field("plugin", &self.store.data().plugin)
            .field("root", &self.root)
            .field("failed", &self.failed)
            .finish_non_exhaustive()
    }
}

impl Vm {
    fn has_export(&mut self, name: &str) -> bool {
        self.instance.get_func(&mut self.store, name).is_some()
    }

    /// Calls an export with `context` as the current context, as Envoy's `SaveRestoreContext`.
    fn call<P: WasmParams, R: WasmResults>(
        &mut self,
        name: &'static str,
        context: u32,
        params: P,
    ) -> Result<R, VmError> {
        if let Some(first) = &self.failed {
            return Err(VmError::Failed {
                callback: name,
                first: first.clone(),
            });
        }
        let func = self
            .instance
            .get_typed_func::<P, R>(&mut self.store, name)
            .map_err(|e| VmError::Setup(format!("export {name}: {e}")))?;
        let state = self.store.data_mut();
        let saved = (state.current, state.effective);
        (state.current, state.effective) = (context, 0);
        let result = func.call(&mut self.store, params);
        let state = self.store.data_mut();
        (state.current, state.effective) = saved;
        result.map_err(|e| {
            let panic = self
                .store
                .data()
                .calls
                .iter()
                .rev()
                .find_map(|r| match &r.call {
                    HostCall::Log {
                        level: LogLevel::Critical,
                        message,
                    } => Some(message.clone()),
                    _ => None,
                });
            let message = format!("{e:?}");
            self.failed = Some(message.clone());
            VmError::Trap {
                callback: name,
                message,
                panic,
            }
        })
    }

    fn new_context(&mut self, context: Context) -> u32 {
        let state = self.store.data_mut();
        let id = state.next_context_id;
        state.next_context_id += 1;
        state.contexts.insert(id, context);
        id
    }

    /// Creates the plugin's root context and starts the VM: `proxy_on_context_create(root, 0)`
    /// then `proxy_on_vm_start(root, vm_configuration_size)`. Returns what on_vm_start said.
    pub fn start(&mut self) -> Result<bool, VmError> {
        let plugin = self.store.data().plugin.clone();
        let (root, ok) = self.start_root(plugin)?;
        self.root = root;
        Ok(ok)
    }

    /// Another plugin in this VM, as Envoy runs every plugin with the same `vm_id` on a worker:
    /// its own root context, `proxy_on_context_create(root, 0)` then `proxy_on_vm_start`.
    /// Returns the root's id and what on_vm_start said; configure it with
    /// [`Vm::configure_root`].
    pub fn add_root(&mut self, plugin: Plugin) -> Result<(u32, bool), VmError> {
        let vm_id = &self.store.data().plugin.vm_id;
        assert_eq!(
            &plugin.vm_id, vm_id,
            "plugins with another vm_id run in another VM"
        );
        self.start_root(plugin)
    }

    fn start_root(&mut self, plugin: Plugin) -> Result<(u32, bool), VmError> {
        let root = self.new_context(Context::Root(RootContext {
            plugin,
            ..RootContext::default()
        }));
        self.call::<(i32, i32), ()>("proxy_on_context_create", root, (root as i32, 0))?;
        let size = self.store.data().plugin.vm_configuration.len() as i32;
        let ok = self.call::<(i32, i32), i32>("proxy_on_vm_start", root, (root as i32, size))?;
        self.apply_deferred()?;
        Ok((root, ok != 0))
    }

    /// `proxy_on_configure(root, plugin_configuration_size)` for the first root; the plugin
    /// configuration buffer exists only during this call. Envoy rejects the plugin when this
    /// returns false.
    pub fn configure(&mut self) -> Result<bool, VmError> {
        self.configure_root(self.root)
    }

    /// [`Vm::configure`] for a root added with [`Vm::add_root`].
    pub fn configure_root(&mut self, root: u32) -> Result<bool, VmError> {
        let size = self.store.data().plugin_of(root).configuration.len() as i32;
        self.store.data_mut().plugin_configuration_visible = true;
        let result = self.call::<(i32, i32), i32>("proxy_on_configure", root, (root as i32, size));
        self.store.data_mut().plugin_configuration_visible = false;
        let ok = result?;
        self.apply_deferred()?;
        Ok(ok != 0)
    }

    /// The first root context's id.
    pub fn root_id(&self) -> u32 {
        self.root
    }

    /// The tick period the first root asked for; `None` when it asked for none (or 0).
    pub fn tick_period(&self) -> Option<Duration> {
        self.tick_period_of(self.root)
    }

    /// The tick period a root asked for.
    pub fn tick_period_of(&self, root: u32) -> Option<Duration> {
        match self.store.data().contexts.get(&root) {
            Some(Context::Root(r)) if r.tick_period_ms > 0 => {
                Some(Duration::from_millis(u64::from(r.tick_period_ms)))
            }
            _ => None,
        }
    }

    /// `proxy_on_tick(root)` for the first root: the test decides when timers fire.
    pub fn tick(&mut self) -> Result<(), VmError> {
        self.tick_root(self.root)
    }

    /// `proxy_on_tick(root)`: every root has its own timer.
    pub fn tick_root(&mut self, root: u32) -> Result<(), VmError> {
        self.call::<i32, ()>("proxy_on_tick", root, root as i32)?;
        self.apply_deferred()
    }

    /// A new HTTP stream on the first root: `proxy_on_context_create(stream, root)`.
    pub fn create_http_stream(&mut self) -> Result<u32, VmError> {
        self.create_http_stream_on(self.root)
    }

    /// A new HTTP stream on a root.
    pub fn create_http_stream_on(&mut self, root: u32) -> Result<u32, VmError> {
        let id = self.new_context(Context::Http(Stream {
            root,
            ..Stream::default()
        }));
        self.call::<(i32, i32), ()>("proxy_on_context_create", id, (id as i32, root as i32))?;
        Ok(id)
    }

    /// `proxy_on_request_headers`. The headers stay visible to the module only if it pauses.
    pub fn request_headers(
        &mut self,
        stream: u32,
        headers: &[(&str, &str)],
        end_of_stream: bool,
    ) -> Result<Action, VmError> {
        let pairs: Pairs = headers
            .iter()
            .map(|(k, v)| (k.to_ascii_lowercase(), (*v).to_string()))
            .collect();
        self.stream_state(stream).request_headers = Some(pairs);
        let raw = self.call::<(i32, i32, i32), i32>(
            "proxy_on_request_headers",
            stream,
            (
                stream as i32,
                headers.len() as i32,
                i32::from(end_of_stream),
            ),
        )?;
        self.apply_deferred()?;
        let action = Action::from_raw(raw);
        if action == Action::Continue {
            self.stream_state(stream).request_headers = None;
        }
        Ok(action)
    }

    /// One request body chunk: `proxy_on_request_body(stream, body_size, end_of_stream)`.
    /// While the module holds the body (it paused), chunks accumulate and `body_size` counts
    /// all of them; Continue sends what the buffer holds on (see [`Stream::forwarded`]).
    pub fn request_body(
        &mut self,
        stream: u32,
        chunk: &[u8],
        end_of_stream: bool,
    ) -> Result<Action, VmError> {
        let s = self.stream_state(stream);
        if s.buffering {
            s.body.extend_from_slice(chunk);
        } else {
            s.body = chunk.to_vec();
        }
        let size = s.body.len() as i32;
        let raw = self.call::<(i32, i32, i32), i32>(
            "proxy_on_request_body",
            stream,
            (stream as i32, size, i32::from(end_of_stream)),
        )?;
        self.apply_deferred()?;
        let action = Action::from_raw(raw);
        let s = self.stream_state(stream);
        if action == Action::Continue {
            let body = std::mem::take(&mut s.body);
            s.forwarded.extend_from_slice(&body);
            s.buffering = false;
        } else {
            s.buffering = true;
        }
        Ok(action)
    }

    /// Delivers a callout response the way Envoy's `onHttpCallSuccess` does: to the root
    /// context that made the call, with the response readable only during the callback.
    pub fn http_call_response(
        &mut self,
        token: u32,
        response: HttpResponse,
    ) -> Result<(), VmError> {
        let callout = self
            .store
            .data_mut()
            .callouts
            .remove(&token)
            .ok_or(VmError::UnknownToken(token))?;
        let (headers, body, trailers) = (
            response.headers.len() as i32,
            response.body.len() as i32,
            response.trailers.len() as i32,
        );
        self.store.data_mut().call_response = Some(response);
        let result = self.call::<(i32, i32, i32, i32, i32), ()>(
            "proxy_on_http_call_response",
            callout.root,
            (callout.root as i32, token as i32, headers, body, trailers),
        );
        self.store.data_mut().call_response = None;
        result?;
        self.apply_deferred()
    }

    /// A callout that failed without a response (reset, or a response over the buffer limit),
    /// the way Envoy's `onHttpCallFailure` reports it: no headers, no body, no response maps,
    /// and `proxy_get_status` saying BrokenConnection "reset".
    pub fn http_call_reset(&mut self, token: u32) -> Result<(), VmError> {
        let callout = self
            .store
            .data_mut()
            .callouts
            .remove(&token)
            .ok_or(VmError::UnknownToken(token))?;
        let root = callout.root;
        if let Some(r) = self.store.data_mut().root_mut(root) {
            r.status = (Status::BrokenConnection as u32, "reset".into());
        }
        let result = self.call::<(i32, i32, i32, i32, i32), ()>(
            "proxy_on_http_call_response",
            root,
            (root as i32, token as i32, 0, 0, 0),
        );
        if let Some(r) = self.store.data_mut().root_mut(root) {
            r.status.1.clear();
        }
        result?;
        self.apply_deferred()
    }

    /// A message arrives on a gRPC stream, as Envoy's `onGrpcReceive`: to the root that owns
    /// it, readable only during the callback.
    pub fn grpc_receive(&mut self, token: u32, message: &[u8]) -> Result<(), VmError> {
        let root = self
            .store
            .data()
            .grpc_streams
            .get(&token)
            .map(|s| s.root)
            .ok_or(VmError::UnknownToken(token))?;
        let state = self.store.data_mut();
        state.grpc_receive = Some(message.to_vec());
        if let Some(s) = state.grpc_streams.get_mut(&token) {
            s.received.push(message.to_vec());
        }
        let result = self.call::<(i32, i32, i32), ()>(
            "proxy_on_grpc_receive",
            root,
            (root as i32, token as i32, message.len() as i32),
        );
        self.store.data_mut().grpc_receive = None;
        result?;
        self.apply_deferred()
    }

    /// A gRPC stream ends (the peer's trailers, a reset, the upstream gone), as Envoy's
    /// `onGrpcClose`: `proxy_on_grpc_close` on its root; Envoy forgets the token.
    pub fn grpc_close(&mut self, token: u32, status: u32) -> Result<(), VmError> {
        let stream = self
            .store
            .data_mut()
            .grpc_streams
            .remove(&token)
            .ok_or(VmError::UnknownToken(token))?;
        let root = stream.root;
        self.store
            .data_mut()
            .closed_grpc_streams
            .insert(token, stream);
        self.call::<(i32, i32, i32), ()>(
            "proxy_on_grpc_close",
            root,
            (root as i32, token as i32, status as i32),
        )?;
        self.apply_deferred()
    }

    /// Open gRPC streams by token.
    pub fn grpc_streams(&self) -> &std::collections::BTreeMap<u32, GrpcStream> {
        &self.store.data().grpc_streams
    }

    /// A gRPC stream, open or closed.
    pub fn grpc_stream(&self, token: u32) -> Option<&GrpcStream> {
        let state = self.store.data();
        state
            .grpc_streams
            .get(&token)
            .or_else(|| state.closed_grpc_streams.get(&token))
    }

    /// Ends a stream: `proxy_on_done`, `proxy_on_log`, `proxy_on_delete`.
    pub fn finish_stream(&mut self, stream: u32) -> Result<bool, VmError> {
        let done = self.call::<i32, i32>("proxy_on_done", stream, stream as i32)?;
        self.call::<i32, ()>("proxy_on_log", stream, stream as i32)?;
        self.call::<i32, ()>("proxy_on_delete", stream, stream as i32)?;
        self.apply_deferred()?;
        self.store.data_mut().contexts.remove(&stream);
        Ok(done != 0)
    }

    /// A new downstream connection on the first root, as Envoy's network filter starts one:
    /// `proxy_on_context_create(connection, root)` then `proxy_on_new_connection`.
    pub fn create_connection(&mut self) -> Result<u32, VmError> {
        self.create_connection_on(self.root)
    }

    /// A new downstream connection on a root.
    pub fn create_connection_on(&mut self, root: u32) -> Result<u32, VmError> {
        let id = self.new_context(Context::Connection(Connection::new(root)));
        self.call::<(i32, i32), ()>("proxy_on_context_create", id, (id as i32, root as i32))?;
        let raw = self.call::<i32, i32>("proxy_on_new_connection", id, id as i32)?;
        if let Some(c) = self.store.data_mut().connection_mut(id) {
            c.new_connection = Action::from_raw(raw);
        }
        self.apply_deferred()?;
        Ok(id)
    }

    /// Bytes read from the client: `proxy_on_downstream_data(connection, size, end_of_stream)`.
    ///
    /// As in Envoy, `size` is the whole read buffer: after the filter paused, earlier bytes are
    /// still there and the new ones follow them. Deferred actions (a resume, a close) run when
    /// the callback returns; then, if the filter said Continue and the connection is still
    /// open, echo writes the buffer back (through `proxy_on_upstream_data`) and empties it. On
    /// Pause the bytes stay, and stay visible to the filter. An end of stream half-closes the
    /// read side; whether the connection then closes (Envoy's listeners close it unless
    /// half-close is enabled) is the test's call, with [`Vm::finish_connection`].
    pub fn downstream_data(
        &mut self,
        connection: u32,
        bytes: &[u8],
        end_of_stream: bool,
    ) -> Result<Action, VmError> {
        let c = self.connection_state(connection);
        assert!(
            !c.read_closed,
            "connection {connection}: the client already ended its side"
        );
        c.read_buffer.extend_from_slice(bytes);
        c.read_closed = end_of_stream;
        c.buffer_visible = true;
        let size = c.read_buffer.len() as i32;
        let raw = self.call::<(i32, i32, i32), i32>(
            "proxy_on_downstream_data",
            connection,
            (connection as i32, size, i32::from(end_of_stream)),
        )?;
        self.apply_deferred()?;
        let action = Action::from_raw(raw);
        if action == Action::Continue {
            // A close among the deferred actions ended the context: Envoy's filter manager
            // stops at a connection that is no longer open, and echo never sees the bytes.
            if let Some(c) = self.store.data_mut().connection_mut(connection) {
                c.buffer_visible = false;
                self.echo(connection)?;
            }
        }
        Ok(action)
    }

    /// The client closes the connection (Envoy's RemoteClose), unless the filter already did:
    /// `proxy_on_downstream_connection_close(connection, Remote)`, then, as Envoy's
    /// `onCloseTCP`, `proxy_on_done`, `proxy_on_log`, `proxy_on_delete`.
    pub fn finish_connection(&mut self, connection: u32) -> Result<(), VmError> {
        if self.store.data_mut().connection_mut(connection).is_none() {
            assert!(
                self.store
                    .data()
                    .ended_connections
                    .contains_key(&connection),
                "no connection {connection}"
            );
            return Ok(());
        }
        self.close_connection(connection, PeerType::Remote)?;
        self.apply_deferred()
    }

    /// A connection's state as Envoy sees it, also after it ended.
    pub fn connection(&self, connection: u32) -> &Connection {
        let state = self.store.data();
        match state.contexts.get(&connection) {
            Some(Context::Connection(c)) => c,
            _ => state
                .ended_connections
                .get(&connection)
                .unwrap_or_else(|| panic!("no connection {connection}")),
        }
    }

    fn connection_state(&mut self, connection: u32) -> &mut Connection {
        self.store
            .data_mut()
            .connection_mut(connection)
            .unwrap_or_else(|| panic!("no open connection {connection}"))
    }

    /// Envoy's echo filter taking the read buffer: `connection().write(data, end_stream)`.
    /// It runs only when there is something to pass on (the filter manager's check).
    fn echo(&mut self, connection: u32) -> Result<(), VmError> {
        let c = self.connection_state(connection);
        if c.read_buffer.is_empty() && (!c.read_closed || c.write_closed) {
            return Ok(());
        }
        let data = std::mem::take(&mut c.read_buffer);
        let end_of_stream = c.read_closed;
        self.write(connection, data, end_of_stream)
    }

    /// A write to the client passes this filter's write side first (Envoy's `Context::onWrite`):
    /// `proxy_on_upstream_data` sees the bytes and may change or stop them; an end of stream
    /// is reported as `proxy_on_upstream_connection_close(connection, Unknown)`.
    fn write(
        &mut self,
        connection: u32,
        data: Vec<u8>,
        end_of_stream: bool,
    ) -> Result<(), VmError> {
        let size = data.len() as i32;
        self.connection_state(connection).write_buffer = Some(data);
        let result = self.call::<(i32, i32, i32), i32>(
            "proxy_on_upstream_data",
            connection,
            (connection as i32, size, i32::from(end_of_stream)),
        );
        let c = self.connection_state(connection);
        let data = c.write_buffer.take().unwrap_or_default();
        let action = Action::from_raw(result?);
        if action == Action::Continue {
            c.written.extend_from_slice(&data);
            c.write_closed |= end_of_stream;
        } else {
            c.write_stopped.extend_from_slice(&data);
        }
        if end_of_stream {
            self.call::<(i32, i32), ()>(
                "proxy_on_upstream_connection_close",
                connection,
                (connection as i32, PeerType::Unknown as i32),
            )?;
        }
        self.apply_deferred()
    }

    /// The connection closes: Envoy raises the close event and the wasm context ends at once
    /// (`Context::onDownstreamConnectionClose`, then `onCloseTCP`).
    fn close_connection(&mut self, connection: u32, peer: PeerType) -> Result<(), VmError> {
        self.connection_state(connection).closed = Some(peer);
        self.call::<(i32, i32), ()>(
            "proxy_on_downstream_connection_close",
            connection,
            (connection as i32, peer as i32),
        )?;
        let done = self.call::<i32, i32>("proxy_on_done", connection, connection as i32)?;
        self.call::<i32, ()>("proxy_on_log", connection, connection as i32)?;
        self.call::<i32, ()>("proxy_on_delete", connection, connection as i32)?;
        let state = self.store.data_mut();
        if let Some(Context::Connection(mut c)) = state.contexts.remove(&connection) {
            c.done = Some(done != 0);
            c.buffer_visible = false;
            // Envoy drops what was read and not written with the connection.
            c.read_buffer.clear();
            state.ended_connections.insert(connection, c);
        }
        Ok(())
    }

    fn stream_state(&mut self, stream: u32) -> &mut Stream {
        self.store
            .data_mut()
            .stream_mut(stream)
            .unwrap_or_else(|| panic!("no HTTP stream {stream}"))
    }

    /// A stream's state as Envoy sees it.
    pub fn stream(&self, stream: u32) -> &Stream {
        match self.store.data().contexts.get(&stream) {
            Some(Context::Http(s)) => s,
            _ => panic!("no HTTP stream {stream}"),
        }
    }

    /// Envoy's `doAfterVmCallActions`: the actions a callback asked for, in order, once the
    /// VM call returned. Some call the VM again (echo's write, a close), and what those ask
    /// for joins the same queue.
    fn apply_deferred(&mut self) -> Result<(), VmError> {
        loop {
            let state = self.store.data_mut();
            if state.deferred.is_empty() {
                return Ok(());
            }
            let action = state.deferred.remove(0);
            match action {
                Deferred::ContinueRequest(id) => {
                    if let Some(s) = self.store.data_mut().stream_mut(id) {
                        s.resumed += 1;
                        s.request_headers = None;
                        if s.buffering {
                            let body = std::mem::take(&mut s.body);
                            s.forwarded.extend_from_slice(&body);
                            s.buffering = false;
                        }
                    }
                }
                Deferred::ResetRequest(id) => {
                    if let Some(s) = self.store.data_mut().stream_mut(id) {
                        s.reset = true;
                    }
                }
                Deferred::LocalResponse(id, response) => {
                    if let Some(s) = self.store.data_mut().stream_mut(id) {
                        s.local_response = Some(response);
                    }
                }
                // Envoy's `continueReading()`: the filter chain goes on after this filter, on
                // a connection that is still open.
                Deferred::ContinueReading(id) => {
                    if let Some(c) = self.store.data_mut().connection_mut(id) {
                        c.resumed += 1;
                        self.echo(id)?;
                    }
                }
                // `close(FlushWrite)` with nothing waiting to be written closes at once.
                Deferred::CloseConnection(id) => {
                    if self.store.data_mut().connection_mut(id).is_some() {
                        self.close_connection(id, PeerType::Local)?;
                    }
                }
            }
        }
    }

    /// Every host call so far.
    pub fn calls(&self) -> &[Recorded] {
        &self.store.data().calls
    }

    /// A position in the call record, for [`Vm::calls_since`].
    pub fn mark(&self) -> usize {
        self.store.data().calls.len()
    }

    /// Host calls after `mark`, without logging (which tests do not assert on).
    pub fn calls_since(&self, mark: usize) -> Vec<Recorded> {
        self.store.data().calls[mark..]
            .iter()
            .filter(|r| !matches!(r.call, HostCall::Log { .. }))
            .cloned()
            .collect()
    }

    /// Callouts dispatched after `mark`, accepted or not (a refused one has token 0).
    pub fn http_calls_since(&self, mark: usize) -> Vec<(HttpCallRequest, Status)> {
        self.store.data().calls[mark..]
            .iter()
            .filter_map(|r| match &r.call {
                HostCall::HttpCall(req) => Some((req.clone(), r.status)),
                _ => None,
            })
            .collect()
    }

    /// Tokens of callouts the test has not answered yet.
    pub fn pending_callouts(&self) -> Vec<u32> {
        self.store.data().callouts.keys().copied().collect()
    }

    /// Log lines (for a failing test's message only).
    pub fn logs(&self) -> Vec<(LogLevel, String)> {
        self.store
            .data()
            .calls
            .iter()
            .filter_map(|r| match &r.call {
                HostCall::Log { level, message } => Some((*level, message.clone())),
                _ => None,
            })
            .collect()
    }

    /// Size of the VM's linear memory in bytes (it only grows).
    pub fn memory_bytes(&mut self) -> usize {
        self.store
            .data()
            .memory
            .map(|m| m.data_size(&self.store))
            .unwrap_or(0)
    }

    /// Whether the VM trapped; Envoy would have failed it.
    pub fn is_failed(&self) -> bool {
        self.failed.is_some()
    }
}
