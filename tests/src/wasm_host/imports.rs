//! The host functions: `env.proxy_*` as Envoy 1.40 (proxy-wasm-cpp-host `exports.cc` plus
//! Envoy's `Context`) implements them, and the few WASI functions the module imports.
//!
//! Values go back to the module the way Envoy returns them: the host calls the module's
//! `malloc` (or, without one, `proxy_on_memory_allocate`), copies the bytes in and writes the
//! pointer and size to the out-parameters; an empty value is a null pointer and size 0.

use wasmtime::{Caller, Engine, FuncType, Linker, Memory, Val, ValType};

use super::abi::{
    decode_pairs, encode_pairs, BufferType, LogLevel, MapType, MetricType, Pairs, Status,
    StreamType,
};
use super::record::{HostCall, HttpCallRequest, LocalResponse, WasiCall};
use super::state::{Callout, Context, Deferred, GrpcStream, Phase, Stat, VmState};

type C<'a> = Caller<'a, VmState>;
type HostResult = wasmtime::Result<i32>;

pub(crate) const WASI: &str = "wasi_snapshot_preview1";

/// The WASI functions this host implements: the module may import these and no others.
pub const WASI_ALLOWED: &[&str] = &[
    "random_get",
    "environ_get",
    "environ_sizes_get",
    "fd_write",
    "proc_exit",
];

/// What Envoy lets the module call while it runs `_initialize` (`WasmBase::startVm`), among
/// the imports this host has.
const ALLOWED_IN_INITIALIZE: &[&str] = &[
    "env.proxy_log",
    "wasi_snapshot_preview1.fd_write",
    "wasi_snapshot_preview1.environ_sizes_get",
    "wasi_snapshot_preview1.environ_get",
    "wasi_snapshot_preview1.random_get",
];

/// What Envoy lets the module call while its allocator runs (`WasmBase::allocMemory`).
const ALLOWED_IN_ALLOCATE: &[&str] = &["env.proxy_log", "wasi_snapshot_preview1.fd_write"];

/// Envoy refuses larger `random_get` requests.
const RANDOM_GET_MAX: u32 = 64 * 1024;

mod errno {
    pub const SUCCESS: u16 = 0;
    pub const BADF: u16 = 8;
    pub const FAULT: u16 = 21;
    pub const INVAL: u16 = 28;
}

/// Envoy's restricted-callback check: V8 traps with "restricted_callback".
fn enter(c: &C<'_>, module: &str, name: &str) -> wasmtime::Result<()> {
    let allowed = match c.data().phase {
        Phase::Normal => return Ok(()),
        Phase::Initialize => ALLOWED_IN_INITIALIZE,
        Phase::Allocate => ALLOWED_IN_ALLOCATE,
    };
    let full = format!("{module}.{name}");
    if allowed.contains(&full.as_str()) {
        Ok(())
    } else {
        Err(wasmtime::format_err!(
            "restricted_callback: {full} called during {:?}",
            c.data().phase
        ))
    }
}

fn memory(c: &C<'_>) -> Memory {
    c.data()
        .memory
        .expect("the host sets the memory before calling the module")
}

/// Envoy's `getMemory`: `None` when the range leaves linear memory.
fn read(c: &C<'_>, ptr: i32, len: i32) -> Option<Vec<u8>> {
    let (ptr, len) = (ptr as u32 as usize, len as u32 as usize);
    memory(c)
        .data(c)
        .get(ptr..ptr.checked_add(len)?)
        .map(<[u8]>::to_vec)
}

fn read_string(c: &C<'_>, ptr: i32, len: i32) -> Option<String> {
    read(c, ptr, len).map(|b| String::from_utf8_lossy(&b).into_owned())
}

fn write(c: &mut C<'_>, ptr: i32, bytes: &[u8]) -> bool {
    let ptr = ptr as u32 as usize;
    let m = memory(c);
    match m.data_mut(c).get_mut(ptr..ptr + bytes.len()) {
        Some(dst) => {
            dst.copy_from_slice(bytes);
            true
        }
        None => false,
    }
}

fn set_word(c: &mut C<'_>, ptr: i32, word: u32) -> bool {
    write(c, ptr, &word.to_le_bytes())
}

/// Copies bytes into memory the module allocated; `None` if its allocator failed.
fn alloc_copy(c: &mut C<'_>, bytes: &[u8]) -> wasmtime::Result<Option<u32>> {
    let malloc = c
        .data()
        .malloc
        .clone()
        .expect("instantiation checked for an allocator export");
    let saved = c.data().phase;
    c.data_mut().phase = Phase::Allocate;
    let result = malloc.call(&mut *c, bytes.len() as i32);
    c.data_mut().phase = saved;
    let ptr = result?;
    if ptr == 0 || !write(c, ptr, bytes) {
        return Ok(None);
    }
    Ok(Some(ptr as u32))
}

/// Envoy's `copyToPointerSize`.
fn copy_out(c: &mut C<'_>, bytes: &[u8], ptr_ptr: i32, size_ptr: i32) -> wasmtime::Result<Status> {
    let ptr = if bytes.is_empty() {
        0
    } else {
        match alloc_copy(c, bytes)? {
            Some(p) => p,
            None => return Ok(Status::InvalidMemoryAccess),
        }
    };
    if set_word(c, ptr_ptr, ptr) && set_word(c, size_ptr, bytes.len() as u32) {
        Ok(Status::Ok)
    } else {
        Ok(Status::InvalidMemoryAccess)
    }
}

fn done(c: &mut C<'_>, call: HostCall, status: Status) -> HostResult {
    Ok(c.data_mut().record(call, status) as i32)
}

fn bad_enum(c: &mut C<'_>, name: &'static str, value: i32) -> HostResult {
    done(c, HostCall::BadEnum { name, value }, Status::BadArgument)
}

/// The bytes `proxy_get_buffer_bytes` sees (Envoy's `Context::getBuffer`); `None` is NotFound.
fn buffer(state: &VmState, buffer: BufferType) -> Option<Vec<u8>> {
    let ctx = state.context_id();
    match buffer {
        BufferType::HttpRequestBody => Some(match state.contexts.get(&ctx) {
            Some(Context::Http(s)) => s.body.clone(),
            _ => Vec::new(),
        }),
        // Envoy points the wrapper at the connection's buffer, or at nothing: an absent
        // buffer reads as empty (Ok), it is not NotFound.
        BufferType::DownstreamData => Some(match state.contexts.get(&ctx) {
            Some(Context::Connection(c)) if c.buffer_visible => c.read_buffer.clone(),
            _ => Vec::new(),
        }),
        BufferType::UpstreamData => Some(match state.contexts.get(&ctx) {
            Some(Context::Connection(c)) => c.write_buffer.clone().unwrap_or_default(),
            _ => Vec::new(),
        }),
        BufferType::HttpCallResponseBody => state.call_response.as_ref().map(|r| r.body.clone()),
        BufferType::VmConfiguration => Some(state.plugin.vm_configuration.clone()),
        BufferType::PluginConfiguration => state
            .plugin_configuration_visible
            .then(|| state.plugin_of(ctx).configuration.clone()),
        BufferType::GrpcReceiveBuffer => Some(state.grpc_receive.clone().unwrap_or_default()),
        BufferType::HttpResponseBody | BufferType::CallData => Some(Vec::new()),
    }
}

/// Envoy's `Buffer::copyFrom` on a live buffer: at 0, drain `size` bytes and prepend the data;
/// at or past the end, append; anything else is refused.
fn copy_from(buf: &mut Vec<u8>, start: i32, size: i32, data: Vec<u8>) -> Status {
    let (start, size) = (start as u32 as usize, size as u32 as usize);
    if start == 0 {
        buf.drain(..size.min(buf.len()));
        buf.splice(0..0, data);
        Status::Ok
    } else if start >= buf.len() {
        buf.extend_from_slice(&data);
        Status::Ok
    } else {
        Status::BadArgument
    }
}

/// A header map for reading (Envoy's `getConstMap`); `None` when it does not exist now.
fn map(state: &VmState, map: MapType) -> Option<Pairs> {
    let ctx = state.context_id();
    match map {
        MapType::HttpRequestHeaders => match state.contexts.get(&ctx) {
            Some(Context::Http(s)) => s.request_headers.clone(),
            _ => None,
        },
        MapType::HttpCallResponseHeaders => state.call_response.as_ref().map(|r| r.headers.clone()),
        MapType::HttpCallResponseTrailers => state
            .call_response
            .as_ref()
            .filter(|r| !r.trailers.is_empty())
            .map(|r| r.trailers.clone()),
        _ => None,
    }
}

/// A header map for writing (Envoy's `getMap`): only the request headers exist here.
fn map_mut(state: &mut VmState, map: MapType) -> Option<&mut Pairs> {
    let ctx = state.context_id();
    match (map, state.contexts.get_mut(&ctx)) {
        (MapType::HttpRequestHeaders, Some(Context::Http(s))) => s.request_headers.as_mut(),
        _ => None,
    }
}

fn remove_key(pairs: &mut Pairs, key: &str) {
    pairs.retain(|(k, _)| k != key);
}

pub(crate) fn define(linker: &mut Linker<VmState>, engine: &Engine) -> wasmtime::Result<()> {
    define_general(linker)?;
    define_buffers_and_maps(linker)?;
    define_shared_data_and_callouts(linker)?;
    define_stream_control(linker)?;
    define_grpc_streams(linker)?;
    define_metrics(linker)?;
    define_unsupported(linker, engine)?;
    define_wasi(linker)
}

fn define_general(linker: &mut Linker<VmState>) -> wasmtime::Result<()> {
    linker.func_wrap(
        "env",
        "proxy_log",
        |mut c: C<'_>, level: i32, ptr: i32, len: i32| -> HostResult {
            enter(&c, "env", "proxy_log")?;
            let Some(level) = LogLevel::from_raw(level) else {
                return bad_enum(&mut c, "proxy_log", level);
            };
            let Some(message) = read_string(&c, ptr, len) else {
                let call = HostCall::Log {
                    level,
                    message: String::new(),
                };
                return done(&mut c, call, Status::InvalidMemoryAccess);
            };
            if std::env::var_os("VMESH_WASM_LOG").is_some() {
                eprintln!("wasm log [{level:?}] {message}");
            }
            done(&mut c, HostCall::Log { level, message }, Status::Ok)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_get_log_level",
        |mut c: C<'_>, ptr: i32| -> HostResult {
            enter(&c, "env", "proxy_get_log_level")?;
            let level = c.data().process.borrow().log_level as u32;
            let status = if set_word(&mut c, ptr, level) {
                Status::Ok
            } else {
                Status::InvalidMemoryAccess
            };
            done(&mut c, HostCall::GetLogLevel, status)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_get_current_time_nanoseconds",
        |mut c: C<'_>, ptr: i32| -> HostResult {
            enter(&c, "env", "proxy_get_current_time_nanoseconds")?;
            let now = c.data().process.borrow().now_ns;
            let status = if write(&mut c, ptr, &now.to_le_bytes()) {
                Status::Ok
            } else {
                Status::InvalidMemoryAccess
            };
            done(&mut c, HostCall::GetCurrentTime, status)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_set_tick_period_milliseconds",
        |mut c: C<'_>, millis: i32| -> HostResult {
            enter(&c, "env", "proxy_set_tick_period_milliseconds")?;
            let ctx = c.data().context_id();
            if let Some(root) = c.data_mut().root_mut(ctx) {
                root.tick_period_ms = millis as u32;
            }
            let call = HostCall::SetTickPeriod {
                millis: millis as u32,
            };
            done(&mut c, call, Status::Ok)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_get_property",
        |mut c: C<'_>, path_ptr: i32, path_len: i32, ptr_ptr: i32, size_ptr: i32| -> HostResult {
            enter(&c, "env", "proxy_get_property")?;
            let Some(raw) = read(&c, path_ptr, path_len) else {
                let call = HostCall::GetProperty { path: Vec::new() };
                return done(&mut c, call, Status::InvalidMemoryAccess);
            };
            let path: Vec<String> = raw
                .split(|b| *b == 0)
                .map(|p| String::from_utf8_lossy(p).into_owned())
                .collect();
            let state = c.data();
            let value = match path.as_slice() {
                [p] if p == "plugin_root_id" => Some(
                    state
                        .plugin_of(state.context_id())
                        .root_id
                        .clone()
                        .into_bytes(),
                ),
                [p] if p == "plugin_name" => Some(
                    state
                        .plugin_of(state.context_id())
                        .name
                        .clone()
                        .into_bytes(),
                ),
                [p] if p == "plugin_vm_id" => Some(state.plugin.vm_id.clone().into_bytes()),
                _ => state.properties.get(&path).cloned(),
            };
            let status = match value {
                Some(v) => copy_out(&mut c, &v, ptr_ptr, size_ptr)?,
                None => Status::NotFound,
            };
            done(&mut c, HostCall::GetProperty { path }, status)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_set_property",
        |mut c: C<'_>, path_ptr: i32, path_len: i32, v_ptr: i32, v_len: i32| -> HostResult {
            enter(&c, "env", "proxy_set_property")?;
            let (Some(raw), Some(value)) = (read(&c, path_ptr, path_len), read(&c, v_ptr, v_len))
            else {
                let call = HostCall::SetProperty {
                    path: Vec::new(),
                    value: Vec::new(),
                };
                return done(&mut c, call, Status::InvalidMemoryAccess);
            };
            let path: Vec<String> = raw
                .split(|b| *b == 0)
                .map(|p| String::from_utf8_lossy(p).into_owned())
                .collect();
            // Envoy writes filter state, which only a stream or a connection has.
            let ctx = c.data().context_id();
            let status = if c.data().has_stream_info(ctx) {
                c.data_mut().properties.insert(path.clone(), value.clone());
                Status::Ok
            } else {
                Status::NotFound
            };
            done(&mut c, HostCall::SetProperty { path, value }, status)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_set_effective_context",
        |mut c: C<'_>, context: i32| -> HostResult {
            enter(&c, "env", "proxy_set_effective_context")?;
            let context = context as u32;
            let status = if c.data().contexts.contains_key(&context) {
                c.data_mut().effective = context;
                Status::Ok
            } else {
                Status::BadArgument
            };
            done(&mut c, HostCall::SetEffectiveContext { context }, status)
        },
    )?;
    linker.func_wrap("env", "proxy_done", |mut c: C<'_>| -> HostResult {
        enter(&c, "env", "proxy_done")?;
        let ctx = c.data().context_id();
        let status = match c.data_mut().root_mut(ctx) {
            Some(root) if root.pending_done => {
                root.pending_done = false;
                Status::Ok
            }
            _ => Status::NotFound,
        };
        done(&mut c, HostCall::Done, status)
    })?;
    linker.func_wrap(
        "env",
        "proxy_get_status",
        |mut c: C<'_>, code_ptr: i32, ptr_ptr: i32, size_ptr: i32| -> HostResult {
            enter(&c, "env", "proxy_get_status")?;
            let ctx = c.data().context_id();
            let (code, message) = c
                .data_mut()
                .root_mut(ctx)
                .map(|r| r.status.clone())
                .unwrap_or_default();
            let status = if set_word(&mut c, code_ptr, code) {
                copy_out(&mut c, message.as_bytes(), ptr_ptr, size_ptr)?
            } else {
                Status::InvalidMemoryAccess
            };
            done(&mut c, HostCall::GetStatus, status)
        },
    )?;
    Ok(())
}

fn define_buffers_and_maps(linker: &mut Linker<VmState>) -> wasmtime::Result<()> {
    linker.func_wrap(
        "env",
        "proxy_get_buffer_bytes",
        |mut c: C<'_>,
         kind: i32,
         start: i32,
         max: i32,
         ptr_ptr: i32,
         size_ptr: i32|
         -> HostResult {
            enter(&c, "env", "proxy_get_buffer_bytes")?;
            let Some(kind) = BufferType::from_raw(kind) else {
                return bad_enum(&mut c, "proxy_get_buffer_bytes", kind);
            };
            let call = HostCall::GetBuffer {
                buffer: kind,
                start: start as u32,
                max_size: max as u32,
            };
            let Some(bytes) = buffer(c.data(), kind) else {
                return done(&mut c, call, Status::NotFound);
            };
            // Envoy: clamp to the buffer, never overread; nothing to copy is a null pointer.
            let (start, max) = (start as u32 as usize, max as u32 as usize);
            let slice = bytes
                .get(start..)
                .map(|rest| &rest[..rest.len().min(max)])
                .unwrap_or_default();
            let status = if slice.is_empty() {
                if set_word(&mut c, ptr_ptr, 0) && set_word(&mut c, size_ptr, 0) {
                    Status::Ok
                } else {
                    Status::InvalidMemoryAccess
                }
            } else {
                copy_out(&mut c, slice, ptr_ptr, size_ptr)?
            };
            done(&mut c, call, status)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_set_buffer_bytes",
        |mut c: C<'_>, kind: i32, start: i32, size: i32, ptr: i32, len: i32| -> HostResult {
            enter(&c, "env", "proxy_set_buffer_bytes")?;
            let Some(kind) = BufferType::from_raw(kind) else {
                return bad_enum(&mut c, "proxy_set_buffer_bytes", kind);
            };
            let data = read(&c, ptr, len);
            let call = HostCall::SetBuffer {
                buffer: kind,
                start: start as u32,
                size: size as u32,
                data: data.clone().unwrap_or_default(),
            };
            let ctx = c.data().context_id();
            let state = c.data_mut();
            let status = match (kind, data) {
                (_, None) => Status::InvalidMemoryAccess,
                (BufferType::HttpRequestBody, Some(data)) => match state.stream_mut(ctx) {
                    Some(s) => copy_from(&mut s.body, start, size, data),
                    None => Status::NotFound,
                },
                // Without a buffer behind it Envoy's wrapper is an empty string buffer, which
                // refuses writes.
                (BufferType::DownstreamData, Some(data)) => match state.connection_mut(ctx) {
                    Some(conn) if conn.buffer_visible => {
                        copy_from(&mut conn.read_buffer, start, size, data)
                    }
                    _ => Status::BadArgument,
                },
                (BufferType::UpstreamData, Some(data)) => {
                    match state
                        .connection_mut(ctx)
                        .and_then(|c| c.write_buffer.as_mut())
                    {
                        Some(buf) => copy_from(buf, start, size, data),
                        None => Status::BadArgument,
                    }
                }
                (BufferType::HttpCallResponseBody, _) if state.call_response.is_none() => {
                    Status::NotFound
                }
                (BufferType::PluginConfiguration, _) if !state.plugin_configuration_visible => {
                    Status::NotFound
                }
                // Configurations and callout responses are immutable.
                _ => Status::BadArgument,
            };
            done(&mut c, call, status)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_get_header_map_pairs",
        |mut c: C<'_>, kind: i32, ptr_ptr: i32, size_ptr: i32| -> HostResult {
            enter(&c, "env", "proxy_get_header_map_pairs")?;
            let Some(kind) = MapType::from_raw(kind) else {
                return bad_enum(&mut c, "proxy_get_header_map_pairs", kind);
            };
            let pairs = map(c.data(), kind).unwrap_or_default();
            let blob = if pairs.is_empty() {
                Vec::new()
            } else {
                encode_pairs(&pairs)
            };
            let status = copy_out(&mut c, &blob, ptr_ptr, size_ptr)?;
            done(&mut c, HostCall::GetHeaderMapPairs { map: kind }, status)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_set_header_map_pairs",
        |mut c: C<'_>, kind: i32, ptr: i32, len: i32| -> HostResult {
            enter(&c, "env", "proxy_set_header_map_pairs")?;
            let Some(kind) = MapType::from_raw(kind) else {
                return bad_enum(&mut c, "proxy_set_header_map_pairs", kind);
            };
            let Some(blob) = read(&c, ptr, len) else {
                let call = HostCall::SetHeaderMapPairs {
                    map: kind,
                    pairs: Vec::new(),
                };
                return done(&mut c, call, Status::InvalidMemoryAccess);
            };
            let pairs: Pairs = decode_pairs(&blob)
                .into_iter()
                .map(|(k, v)| (k.to_ascii_lowercase(), v))
                .collect();
            let status = match map_mut(c.data_mut(), kind) {
                Some(m) => {
                    *m = pairs.clone();
                    Status::Ok
                }
                None => Status::BadArgument,
            };
            done(
                &mut c,
                HostCall::SetHeaderMapPairs { map: kind, pairs },
                status,
            )
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_get_header_map_value",
        |mut c: C<'_>,
         kind: i32,
         k_ptr: i32,
         k_len: i32,
         ptr_ptr: i32,
         size_ptr: i32|
         -> HostResult {
            enter(&c, "env", "proxy_get_header_map_value")?;
            let Some(kind) = MapType::from_raw(kind) else {
                return bad_enum(&mut c, "proxy_get_header_map_value", kind);
            };
            let Some(key) = read_string(&c, k_ptr, k_len) else {
                let call = HostCall::GetHeaderMapValue {
                    map: kind,
                    key: String::new(),
                };
                return done(&mut c, call, Status::InvalidMemoryAccess);
            };
            let lower = key.to_ascii_lowercase();
            let status = match map(c.data(), kind) {
                // The map does not exist now: Envoy answers BadArgument (the Rust SDK panics).
                None => Status::BadArgument,
                Some(pairs) => match pairs.iter().find(|(k, _)| *k == lower) {
                    Some((_, v)) => copy_out(&mut c, v.as_bytes(), ptr_ptr, size_ptr)?,
                    None => Status::NotFound,
                },
            };
            done(
                &mut c,
                HostCall::GetHeaderMapValue { map: kind, key },
                status,
            )
        },
    )?;
    for (name, replace) in [
        ("proxy_add_header_map_value", false),
        ("proxy_replace_header_map_value", true),
    ] {
        linker.func_wrap(
            "env",
            name,
            move |mut c: C<'_>,
                  kind: i32,
                  k_ptr: i32,
                  k_len: i32,
                  v_ptr: i32,
                  v_len: i32|
                  -> HostResult {
                enter(&c, "env", name)?;
                let Some(kind) = MapType::from_raw(kind) else {
                    return bad_enum(&mut c, "proxy_add/replace_header_map_value", kind);
                };
                let key = read_string(&c, k_ptr, k_len);
                let value = read_string(&c, v_ptr, v_len);
                let ok = key.is_some() && value.is_some();
                let (key, value) = (key.unwrap_or_default(), value.unwrap_or_default());
                let lower = key.to_ascii_lowercase();
                let status = match (ok, map_mut(c.data_mut(), kind)) {
                    (false, _) => Status::InvalidMemoryAccess,
                    (true, None) => Status::BadArgument,
                    (true, Some(m)) => {
                        if replace {
                            remove_key(m, &lower);
                        }
                        m.push((lower, value.clone()));
                        Status::Ok
                    }
                };
                let call = if replace {
                    HostCall::ReplaceHeaderMapValue {
                        map: kind,
                        key,
                        value,
                    }
                } else {
                    HostCall::AddHeaderMapValue {
                        map: kind,
                        key,
                        value,
                    }
                };
                done(&mut c, call, status)
            },
        )?;
    }
    linker.func_wrap(
        "env",
        "proxy_remove_header_map_value",
        |mut c: C<'_>, kind: i32, k_ptr: i32, k_len: i32| -> HostResult {
            enter(&c, "env", "proxy_remove_header_map_value")?;
            let Some(kind) = MapType::from_raw(kind) else {
                return bad_enum(&mut c, "proxy_remove_header_map_value", kind);
            };
            let Some(key) = read_string(&c, k_ptr, k_len) else {
                let call = HostCall::RemoveHeaderMapValue {
                    map: kind,
                    key: String::new(),
                };
                return done(&mut c, call, Status::InvalidMemoryAccess);
            };
            let lower = key.to_ascii_lowercase();
            let status = match map_mut(c.data_mut(), kind) {
                Some(m) => {
                    remove_key(m, &lower);
                    Status::Ok
                }
                None => Status::BadArgument,
            };
            done(
                &mut c,
                HostCall::RemoveHeaderMapValue { map: kind, key },
                status,
            )
        },
    )?;
    Ok(())
}

fn define_shared_data_and_callouts(linker: &mut Linker<VmState>) -> wasmtime::Result<()> {
    linker.func_wrap(
        "env",
        "proxy_get_shared_data",
        |mut c: C<'_>,
         k_ptr: i32,
         k_len: i32,
         ptr_ptr: i32,
         size_ptr: i32,
         cas_ptr: i32|
         -> HostResult {
            enter(&c, "env", "proxy_get_shared_data")?;
            let Some(key) = read_string(&c, k_ptr, k_len) else {
                let call = HostCall::GetSharedData { key: String::new() };
                return done(&mut c, call, Status::InvalidMemoryAccess);
            };
            let slot = (c.data().plugin.vm_id.clone(), key.clone());
            let found = c.data().process.borrow().shared.get(&slot).cloned();
            let status = match found {
                None => Status::NotFound,
                Some((value, cas)) => match copy_out(&mut c, &value, ptr_ptr, size_ptr)? {
                    Status::Ok if set_word(&mut c, cas_ptr, cas) => Status::Ok,
                    Status::Ok => Status::InvalidMemoryAccess,
                    other => other,
                },
            };
            done(&mut c, HostCall::GetSharedData { key }, status)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_set_shared_data",
        |mut c: C<'_>, k_ptr: i32, k_len: i32, v_ptr: i32, v_len: i32, cas: i32| -> HostResult {
            enter(&c, "env", "proxy_set_shared_data")?;
            let (key, value) = (read_string(&c, k_ptr, k_len), read(&c, v_ptr, v_len));
            let ok = key.is_some() && value.is_some();
            let (key, value) = (key.unwrap_or_default(), value.unwrap_or_default());
            let status = if ok {
                let vm_id = c.data().plugin.vm_id.clone();
                c.data()
                    .process
                    .borrow_mut()
                    .set_shared(&vm_id, &key, value.clone(), cas as u32)
            } else {
                Status::InvalidMemoryAccess
            };
            let call = HostCall::SetSharedData {
                key,
                value,
                cas: cas as u32,
            };
            done(&mut c, call, status)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_http_call",
        |mut c: C<'_>,
         up_ptr: i32,
         up_len: i32,
         h_ptr: i32,
         h_len: i32,
         b_ptr: i32,
         b_len: i32,
         t_ptr: i32,
         t_len: i32,
         timeout: i32,
         token_ptr: i32|
         -> HostResult {
            enter(&c, "env", "proxy_http_call")?;
            let upstream = read_string(&c, up_ptr, up_len);
            let headers = read(&c, h_ptr, h_len);
            let body = read(&c, b_ptr, b_len);
            let trailers = read(&c, t_ptr, t_len);
            let mut request = HttpCallRequest {
                token: 0,
                upstream: upstream.clone().unwrap_or_default(),
                headers: headers.as_deref().map(decode_pairs).unwrap_or_default(),
                body: body.clone().unwrap_or_default(),
                trailers: trailers.as_deref().map(decode_pairs).unwrap_or_default(),
                timeout_ms: timeout as u32,
            };
            if upstream.is_none() || headers.is_none() || body.is_none() || trailers.is_none() {
                return done(
                    &mut c,
                    HostCall::HttpCall(request),
                    Status::InvalidMemoryAccess,
                );
            }
            // Envoy writes the token slot first to check it before starting anything.
            if !set_word(&mut c, token_ptr, 0) {
                return done(
                    &mut c,
                    HostCall::HttpCall(request),
                    Status::InvalidMemoryAccess,
                );
            }
            let known = c
                .data()
                .process
                .borrow()
                .clusters
                .contains(&request.upstream);
            let has = |name: &str| request.header(name).is_some();
            if timeout < 0 || !known || !(has(":path") && has(":method") && has(":authority")) {
                return done(&mut c, HostCall::HttpCall(request), Status::BadArgument);
            }
            let state = c.data_mut();
            state.next_http_call_id += 4;
            let token = state.next_http_call_id;
            let root = state.root_of(state.context_id());
            state.callouts.insert(token, Callout { root });
            request.token = token;
            set_word(&mut c, token_ptr, token);
            done(&mut c, HostCall::HttpCall(request), Status::Ok)
        },
    )?;
    Ok(())
}

/// gRPC streams as Envoy's `Context::grpcStream` / `grpcSend` / `grpcClose` / `grpcCancel`:
/// all act on the root of the effective context, so a stream is found only through the root
/// that opened it (NotFound from another root's contexts).
fn define_grpc_streams(linker: &mut Linker<VmState>) -> wasmtime::Result<()> {
    linker.func_wrap(
        "env",
        "proxy_grpc_stream",
        |mut c: C<'_>,
         svc_ptr: i32,
         svc_len: i32,
         name_ptr: i32,
         name_len: i32,
         method_ptr: i32,
         method_len: i32,
         _md_ptr: i32,
         _md_len: i32,
         token_ptr: i32|
         -> HostResult {
            enter(&c, "env", "proxy_grpc_stream")?;
            let cluster = read_string(&c, svc_ptr, svc_len);
            let service = read_string(&c, name_ptr, name_len);
            let method = read_string(&c, method_ptr, method_len);
            let ok = cluster.is_some() && service.is_some() && method.is_some();
            let mut call = HostCall::GrpcStream {
                token: 0,
                cluster: cluster.clone().unwrap_or_default(),
                service: service.clone().unwrap_or_default(),
                method: method.clone().unwrap_or_default(),
            };
            if !ok {
                return done(&mut c, call, Status::InvalidMemoryAccess);
            }
            let cluster = cluster.unwrap_or_default();
            // An unknown cluster: BadArgument (on which the SDK panics).
            if !c.data().process.borrow().clusters.contains(&cluster) {
                return done(&mut c, call, Status::BadArgument);
            }
            let state = c.data_mut();
            let token = state.next_grpc_stream_id;
            state.next_grpc_stream_id += 4;
            let root = state.root_of(state.context_id());
            state.grpc_streams.insert(
                token,
                GrpcStream {
                    root,
                    cluster,
                    service: service.unwrap_or_default(),
                    method: method.unwrap_or_default(),
                    ..GrpcStream::default()
                },
            );
            if let HostCall::GrpcStream { token: t, .. } = &mut call {
                *t = token;
            }
            set_word(&mut c, token_ptr, token);
            done(&mut c, call, Status::Ok)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_grpc_send",
        |mut c: C<'_>, token: i32, ptr: i32, len: i32, end_stream: i32| -> HostResult {
            enter(&c, "env", "proxy_grpc_send")?;
            let token = token as u32;
            let message = if len == 0 {
                Some(Vec::new())
            } else {
                read(&c, ptr, len)
            };
            let call = HostCall::GrpcSend {
                token,
                message: message.clone().unwrap_or_default(),
                end_stream: end_stream != 0,
            };
            let Some(message) = message else {
                return done(&mut c, call, Status::InvalidMemoryAccess);
            };
            let state = c.data_mut();
            let root = state.root_of(state.context_id());
            let status = if token & 3 != 2 {
                Status::BadArgument
            } else {
                match state.grpc_streams.get_mut(&token) {
                    Some(s) if s.root == root && !s.local_closed => {
                        s.sent.push(message);
                        s.local_closed |= end_stream != 0;
                        Status::Ok
                    }
                    _ => Status::NotFound,
                }
            };
            done(&mut c, call, status)
        },
    )?;
    for (name, cancel) in [("proxy_grpc_close", false), ("proxy_grpc_cancel", true)] {
        linker.func_wrap("env", name, move |mut c: C<'_>, token: i32| -> HostResult {
            enter(&c, "env", name)?;
            let token = token as u32;
            let state = c.data_mut();
            let root = state.root_of(state.context_id());
            let status = match state.grpc_streams.get(&token) {
                Some(s) if s.root == root => {
                    if cancel {
                        if let Some(mut s) = state.grpc_streams.remove(&token) {
                            s.cancelled = true;
                            state.closed_grpc_streams.insert(token, s);
                        }
                    } else if let Some(s) = state.grpc_streams.get_mut(&token) {
                        s.local_closed = true;
                    }
                    Status::Ok
                }
                _ => Status::NotFound,
            };
            let call = if cancel {
                HostCall::GrpcCancel { token }
            } else {
                HostCall::GrpcClose { token }
            };
            done(&mut c, call, status)
        })?;
    }
    Ok(())
}

fn define_stream_control(linker: &mut Linker<VmState>) -> wasmtime::Result<()> {
    for (name, close) in [
        ("proxy_continue_stream", false),
        ("proxy_close_stream", true),
    ] {
        linker.func_wrap("env", name, move |mut c: C<'_>, kind: i32| -> HostResult {
            enter(&c, "env", name)?;
            let Some(stream) = StreamType::from_raw(kind) else {
                return bad_enum(&mut c, name, kind);
            };
            let ctx = c.data().context_id();
            let is_stream = c.data_mut().stream_mut(ctx).is_some();
            let is_connection = c.data_mut().connection_mut(ctx).is_some();
            let status = match (stream, close) {
                (StreamType::HttpRequest, false) => {
                    if is_stream {
                        c.data_mut().deferred.push(Deferred::ContinueRequest(ctx));
                    }
                    Status::Ok
                }
                (StreamType::HttpRequest, true) => {
                    if is_stream {
                        c.data_mut().deferred.push(Deferred::ResetRequest(ctx));
                    }
                    Status::Ok
                }
                (StreamType::Downstream, false) => {
                    if is_connection {
                        c.data_mut().deferred.push(Deferred::ContinueReading(ctx));
                    }
                    Status::Ok
                }
                // Both close the one connection a network filter sees, flushing what was
                // already written.
                (StreamType::Downstream | StreamType::Upstream, true) => {
                    if is_connection {
                        c.data_mut().deferred.push(Deferred::CloseConnection(ctx));
                    }
                    Status::Ok
                }
                (StreamType::Upstream, false) => Status::Unimplemented,
                (StreamType::HttpResponse, _) => Status::Ok,
            };
            let call = if close {
                HostCall::CloseStream { stream }
            } else {
                HostCall::ContinueStream { stream }
            };
            done(&mut c, call, status)
        })?;
    }
    linker.func_wrap(
        "env",
        "proxy_send_local_response",
        |mut c: C<'_>,
         code: i32,
         d_ptr: i32,
         d_len: i32,
         b_ptr: i32,
         b_len: i32,
         h_ptr: i32,
         h_len: i32,
         grpc_status: i32|
         -> HostResult {
            enter(&c, "env", "proxy_send_local_response")?;
            let details = read_string(&c, d_ptr, d_len);
            let body = read(&c, b_ptr, b_len);
            let headers = read(&c, h_ptr, h_len);
            let ok = details.is_some() && body.is_some() && headers.is_some();
            let response = LocalResponse {
                status: code as u32,
                details: details.unwrap_or_default(),
                body: body.unwrap_or_default(),
                headers: headers.as_deref().map(decode_pairs).unwrap_or_default(),
                grpc_status,
            };
            let status = if ok {
                let ctx = c.data().context_id();
                if c.data_mut().stream_mut(ctx).is_some() {
                    let deferred = Deferred::LocalResponse(ctx, response.clone());
                    c.data_mut().deferred.push(deferred);
                }
                Status::Ok
            } else {
                Status::InvalidMemoryAccess
            };
            done(&mut c, HostCall::SendLocalResponse(response), status)
        },
    )?;
    Ok(())
}

fn metric_kind(id: u32) -> Option<MetricType> {
    MetricType::from_raw((id & 3) as i32)
}

fn define_metrics(linker: &mut Linker<VmState>) -> wasmtime::Result<()> {
    linker.func_wrap(
        "env",
        "proxy_define_metric",
        |mut c: C<'_>, kind: i32, n_ptr: i32, n_len: i32, id_ptr: i32| -> HostResult {
            enter(&c, "env", "proxy_define_metric")?;
            let Some(kind) = MetricType::from_raw(kind) else {
                return bad_enum(&mut c, "proxy_define_metric", kind);
            };
            let Some(name) = read_string(&c, n_ptr, n_len) else {
                let call = HostCall::DefineMetric {
                    kind,
                    name: String::new(),
                    id: 0,
                };
                return done(&mut c, call, Status::InvalidMemoryAccess);
            };
            let state = c.data_mut();
            let next = &mut state.next_metric_id[kind as usize];
            *next += 4;
            let id = *next;
            state.metric_ids.insert(id, (kind, name.clone()));
            state
                .process
                .borrow_mut()
                .stats
                .entry(name.clone())
                .or_insert(Stat {
                    kind,
                    value: 0,
                    samples: Vec::new(),
                });
            let status = if set_word(&mut c, id_ptr, id) {
                Status::Ok
            } else {
                Status::InvalidMemoryAccess
            };
            done(&mut c, HostCall::DefineMetric { kind, name, id }, status)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_increment_metric",
        |mut c: C<'_>, id: i32, offset: i64| -> HostResult {
            enter(&c, "env", "proxy_increment_metric")?;
            let id = id as u32;
            let name = c.data().metric_ids.get(&id).map(|(_, n)| n.clone());
            let process = c.data().process.clone();
            let mut process = process.borrow_mut();
            let stat = name.and_then(|n| process.stats.get_mut(&n));
            let status = match (metric_kind(id), stat) {
                (Some(MetricType::Counter), Some(s)) if offset > 0 => {
                    s.value = s.value.saturating_add(offset as u64);
                    Status::Ok
                }
                (Some(MetricType::Counter), Some(_)) => Status::BadArgument,
                (Some(MetricType::Gauge), Some(s)) => {
                    s.value = if offset >= 0 {
                        s.value.saturating_add(offset as u64)
                    } else {
                        s.value.saturating_sub(offset.unsigned_abs())
                    };
                    Status::Ok
                }
                (Some(MetricType::Counter | MetricType::Gauge), None) => Status::NotFound,
                _ => Status::BadArgument,
            };
            drop(process);
            done(&mut c, HostCall::IncrementMetric { id, offset }, status)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_record_metric",
        |mut c: C<'_>, id: i32, value: i64| -> HostResult {
            enter(&c, "env", "proxy_record_metric")?;
            let (id, value) = (id as u32, value as u64);
            let name = c.data().metric_ids.get(&id).map(|(_, n)| n.clone());
            let process = c.data().process.clone();
            let mut process = process.borrow_mut();
            let status = match (
                metric_kind(id),
                name.and_then(|n| process.stats.get_mut(&n)),
            ) {
                (Some(MetricType::Counter), Some(s)) => {
                    s.value = s.value.saturating_add(value);
                    Status::Ok
                }
                (Some(MetricType::Gauge), Some(s)) => {
                    s.value = value;
                    Status::Ok
                }
                (Some(MetricType::Histogram), Some(s)) => {
                    s.value = value;
                    s.samples.push(value);
                    Status::Ok
                }
                _ => Status::NotFound,
            };
            drop(process);
            done(&mut c, HostCall::RecordMetric { id, value }, status)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_get_metric",
        |mut c: C<'_>, id: i32, ptr: i32| -> HostResult {
            enter(&c, "env", "proxy_get_metric")?;
            let id = id as u32;
            let name = c.data().metric_ids.get(&id).map(|(_, n)| n.clone());
            let value = name.and_then(|n| c.data().process.borrow().stats.get(&n).map(|s| s.value));
            let status = match (metric_kind(id), value) {
                (Some(MetricType::Counter | MetricType::Gauge), Some(v)) => {
                    if write(&mut c, ptr, &v.to_le_bytes()) {
                        Status::Ok
                    } else {
                        Status::InvalidMemoryAccess
                    }
                }
                (Some(MetricType::Counter | MetricType::Gauge), None) => Status::NotFound,
                _ => Status::BadArgument,
            };
            done(&mut c, HostCall::GetMetric { id }, status)
        },
    )?;
    Ok(())
}

/// Imports the SDK links but this filter never calls (gRPC, shared queues, foreign functions):
/// they answer `Unimplemented` and are recorded, so a test sees if the filter starts using one.
fn define_unsupported(linker: &mut Linker<VmState>, engine: &Engine) -> wasmtime::Result<()> {
    const UNSUPPORTED: &[(&str, usize)] = &[
        ("proxy_grpc_call", 12),
        ("proxy_register_shared_queue", 3),
        ("proxy_resolve_shared_queue", 5),
        ("proxy_enqueue_shared_queue", 3),
        ("proxy_dequeue_shared_queue", 3),
        ("proxy_call_foreign_function", 6),
    ];
    for &(name, arity) in UNSUPPORTED {
        let ty = FuncType::new(engine, vec![ValType::I32; arity], [ValType::I32]);
        linker.func_new("env", name, ty, move |mut c: C<'_>, _params, results| {
            enter(&c, "env", name)?;
            let status = c
                .data_mut()
                .record(HostCall::Unsupported { name }, Status::Unimplemented);
            results[0] = Val::I32(status as i32);
            Ok(())
        })?;
    }
    Ok(())
}

fn wasi(c: &mut C<'_>, call: WasiCall) -> HostResult {
    let errno = match &call {
        WasiCall::RandomGet { errno, .. }
        | WasiCall::EnvironSizesGet { errno }
        | WasiCall::EnvironGet { errno }
        | WasiCall::FdWrite { errno, .. } => *errno,
        WasiCall::ProcExit { .. } => 0,
    };
    c.data_mut().record(HostCall::Wasi(call), Status::Ok);
    Ok(i32::from(errno))
}

fn define_wasi(linker: &mut Linker<VmState>) -> wasmtime::Result<()> {
    linker.func_wrap(
        WASI,
        "random_get",
        |mut c: C<'_>, ptr: i32, len: i32| -> HostResult {
            enter(&c, WASI, "random_get")?;
            let len = len as u32;
            let errno = if len > RANDOM_GET_MAX {
                errno::INVAL
            } else {
                let mut bytes = vec![0u8; len as usize];
                c.data_mut().random_bytes(&mut bytes);
                if write(&mut c, ptr, &bytes) {
                    errno::SUCCESS
                } else {
                    errno::FAULT
                }
            };
            wasi(&mut c, WasiCall::RandomGet { len, errno })
        },
    )?;
    linker.func_wrap(
        WASI,
        "environ_sizes_get",
        |mut c: C<'_>, count_ptr: i32, size_ptr: i32| -> HostResult {
            enter(&c, WASI, "environ_sizes_get")?;
            let errno = if set_word(&mut c, count_ptr, 0) && set_word(&mut c, size_ptr, 0) {
                errno::SUCCESS
            } else {
                errno::FAULT
            };
            wasi(&mut c, WasiCall::EnvironSizesGet { errno })
        },
    )?;
    linker.func_wrap(
        WASI,
        "environ_get",
        |mut c: C<'_>, _environ: i32, _buf: i32| -> HostResult {
            enter(&c, WASI, "environ_get")?;
            wasi(
                &mut c,
                WasiCall::EnvironGet {
                    errno: errno::SUCCESS,
                },
            )
        },
    )?;
    linker.func_wrap(
        WASI,
        "fd_write",
        |mut c: C<'_>, fd: i32, iovs: i32, iovs_len: i32, nwritten_ptr: i32| -> HostResult {
            enter(&c, WASI, "fd_write")?;
            let fd = fd as u32;
            if fd != 1 && fd != 2 {
                let call = WasiCall::FdWrite {
                    fd,
                    text: String::new(),
                    errno: errno::BADF,
                };
                return wasi(&mut c, call);
            }
            let mut text = Vec::new();
            let mut errno = errno::SUCCESS;
            for i in 0..iovs_len as u32 {
                let Some(iov) = read(&c, iovs.wrapping_add((i * 8) as i32), 8) else {
                    errno = errno::FAULT;
                    break;
                };
                let buf = i32::from_le_bytes([iov[0], iov[1], iov[2], iov[3]]);
                let len = i32::from_le_bytes([iov[4], iov[5], iov[6], iov[7]]);
                match read(&c, buf, len) {
                    Some(bytes) => text.extend_from_slice(&bytes),
                    None => {
                        errno = errno::FAULT;
                        break;
                    }
                }
            }
            if errno == errno::SUCCESS && !set_word(&mut c, nwritten_ptr, text.len() as u32) {
                errno = errno::FAULT;
            }
            let text = String::from_utf8_lossy(&text).into_owned();
            wasi(&mut c, WasiCall::FdWrite { fd, text, errno })
        },
    )?;
    linker.func_wrap(
        WASI,
        "proc_exit",
        |mut c: C<'_>, code: i32| -> wasmtime::Result<()> {
            enter(&c, WASI, "proc_exit")?;
            let code = code as u32;
            c.data_mut()
                .record(HostCall::Wasi(WasiCall::ProcExit { code }), Status::Ok);
            // Envoy only logs; the Rust module then reaches `unreachable` and traps. Trap here.
            Err(wasmtime::format_err!("proc_exit({code})"))
        },
    )?;
    Ok(())
}
