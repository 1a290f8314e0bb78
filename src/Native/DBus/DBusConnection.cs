using System.Runtime.InteropServices;

namespace BFMig.Native.DBus;

/// <summary>sd_bus_request_name flags.</summary>
[Flags]
public enum DBusRequestNameFlags : ulong
{
    None = 0,
    ReplaceExisting = 1 << 0,
    AllowReplacement = 1 << 1,
    Queue = 1 << 2,
}

/// <summary>
/// A D-Bus connection through libsystemd's sd-bus. sd-bus objects are single-threaded, so every
/// use goes through one lock; incoming calls and signals are dispatched on a dedicated processing
/// thread (<see cref="StartProcessing"/>), other threads wake it after touching the bus.
/// A short-lived client (the hook) can skip the thread and use <see cref="Call"/> directly.
/// </summary>
public sealed unsafe partial class DBusConnection : IDisposable
{
    private readonly Lock _gate = new();
    private readonly List<Registration> _registrations = [];
    private readonly HashSet<PendingCall> _pendingCalls = [];
    private nint _bus;
    private int _wakeFd = -1;
    private Thread? _thread;
    private volatile bool _stopping;

    private DBusConnection(nint bus) => _bus = bus;

    /// <summary>Raised on the processing thread when the bus connection is lost (not on Dispose).</summary>
    public event Action<DBusException>? Disconnected;

    /// <summary>Connects to the system bus (DBUS_SYSTEM_BUS_ADDRESS or /run/dbus/system_bus_socket).</summary>
    public static DBusConnection OpenSystem() => OpenWith(static p => Interop.SdBus.sd_bus_open_system(p), "open system bus");

    /// <summary>Connects to the user (session) bus.</summary>
    public static DBusConnection OpenUser() => OpenWith(static p => Interop.SdBus.sd_bus_open_user(p), "open user bus");

    /// <summary>Connects to a bus by address, e.g. <c>unix:path=/tmp/x/bus</c> from a private dbus-daemon.</summary>
    public static DBusConnection Open(string address)
    {
        ArgumentException.ThrowIfNullOrEmpty(address);
        nint bus;
        Interop.SdBus.Check(Interop.SdBus.sd_bus_new(&bus), "sd_bus_new");
        try
        {
            Interop.SdBus.Check(Interop.SdBus.sd_bus_set_address(bus, address), "set bus address");
            Interop.SdBus.Check(Interop.SdBus.sd_bus_set_bus_client(bus, 1), "set bus client");
            Interop.SdBus.Check(Interop.SdBus.sd_bus_start(bus), $"connect to {address}");
        }
        catch
        {
            Interop.SdBus.sd_bus_flush_close_unref(bus);
            throw;
        }
        return new DBusConnection(bus);
    }

    private delegate int OpenFunc(nint* bus);

    private static DBusConnection OpenWith(OpenFunc open, string operation)
    {
        nint bus;
        Interop.SdBus.Check(open(&bus), operation);
        return new DBusConnection(bus);
    }

    /// <summary>This connection's unique name (":1.42").</summary>
    public string UniqueName => RunOnBus(() =>
    {
        ThrowIfClosed();
        byte* name;
        Interop.SdBus.Check(Interop.SdBus.sd_bus_get_unique_name(_bus, &name), "get unique name");
        return Interop.SdBus.PtrToString(name)!;
    });

    /// <summary>False after Dispose or once the bus connection is lost.</summary>
    public bool IsOpen => RunOnBus(() => _bus != 0 && Interop.SdBus.sd_bus_is_open(_bus) > 0);

    /// <summary>Requests a well-known name; throws (EEXIST) when another connection owns it and <see cref="DBusRequestNameFlags.Queue"/> is not set.</summary>
    public void RequestName(string name, DBusRequestNameFlags flags = DBusRequestNameFlags.None) => RunOnBus(() =>
    {
        ThrowIfClosed();
        Interop.SdBus.Check(Interop.SdBus.sd_bus_request_name(_bus, name, (ulong)flags), $"request name {name}");
    });

    public void ReleaseName(string name) => RunOnBus(() =>
    {
        ThrowIfClosed();
        Interop.SdBus.Check(Interop.SdBus.sd_bus_release_name(_bus, name), $"release name {name}");
    });

    /// <summary>Emits a signal from <paramref name="path"/>.</summary>
    public void EmitSignal(string path, string interfaceName, string member, Action<DBusMessageWriter>? write = null) => RunOnBus(() =>
    {
        ThrowIfClosed();
        nint message;
        Interop.SdBus.Check(Interop.SdBus.sd_bus_message_new_signal(_bus, &message, path, interfaceName, member), $"new signal {member}");
        try
        {
            write?.Invoke(new DBusMessageWriter(message));
            Interop.SdBus.Check(Interop.SdBus.sd_bus_send(_bus, message, null), $"send signal {member}");
        }
        finally
        {
            Interop.SdBus.sd_bus_message_unref(message);
        }
    });

    /// <summary>
    /// Calls a method and waits for the reply (at most <paramref name="timeout"/>). Error replies
    /// and timeouts throw <see cref="DBusException"/> (timeouts as org.freedesktop.DBus.Error.Timeout
    /// or NoReply). <paramref name="read"/> runs while the reply is valid.
    /// </summary>
    public T Call<T>(string destination, string path, string interfaceName, string member,
        Action<DBusMessageWriter>? write, Func<DBusMessageReader, T> read, TimeSpan timeout)
    {
        ArgumentNullException.ThrowIfNull(read);
        return RunOnBus(() =>
        {
            ThrowIfClosed();
            nint message = NewMethodCall(destination, path, interfaceName, member, write);
            Interop.SdBus.SdBusError error = default;
            nint reply = 0;
            try
            {
                int rc = Interop.SdBus.sd_bus_call(_bus, message, ToMicroseconds(timeout), &error, &reply);
                if (rc < 0)
                {
                    throw ErrorFrom(&error, -rc, $"call {interfaceName}.{member}");
                }
                return read(new DBusMessageReader(reply));
            }
            finally
            {
                Interop.SdBus.sd_bus_error_free(&error);
                if (reply != 0)
                {
                    Interop.SdBus.sd_bus_message_unref(reply);
                }
                Interop.SdBus.sd_bus_message_unref(message);
            }
        });
    }

    /// <summary>Like <see cref="Call{T}"/> for methods without a return value.</summary>
    public void Call(string destination, string path, string interfaceName, string member,
        Action<DBusMessageWriter>? write, TimeSpan timeout) =>
        Call(destination, path, interfaceName, member, write, static _ => true, timeout);

    /// <summary>
    /// Calls a method without blocking: the reply is read by <paramref name="read"/> on the
    /// processing thread (which must run, see <see cref="StartProcessing"/>).
    /// </summary>
    public Task<T> CallAsync<T>(string destination, string path, string interfaceName, string member,
        Action<DBusMessageWriter>? write, Func<DBusMessageReader, T> read, TimeSpan timeout)
    {
        ArgumentNullException.ThrowIfNull(read);
        var pending = new PendingCall<T>(read, $"{interfaceName}.{member}") { Owner = this };
        RunOnBus(() =>
        {
            ThrowIfClosed();
            nint message = NewMethodCall(destination, path, interfaceName, member, write);
            GCHandle state = GCHandle.Alloc(pending);
            try
            {
                Interop.SdBus.Check(Interop.SdBus.sd_bus_call_async(_bus, null, message, &OnReply, GCHandle.ToIntPtr(state),
                    ToMicroseconds(timeout)), $"call {interfaceName}.{member}");
                pending.State = state;
                _pendingCalls.Add(pending);
            }
            catch
            {
                state.Free();
                throw;
            }
            finally
            {
                Interop.SdBus.sd_bus_message_unref(message);
            }
        });
        return pending.Task;
    }

    private nint NewMethodCall(string destination, string path, string interfaceName, string member, Action<DBusMessageWriter>? write)
    {
        nint message;
        Interop.SdBus.Check(Interop.SdBus.sd_bus_message_new_method_call(_bus, &message, destination, path, interfaceName, member),
            $"new method call {member}");
        try
        {
            write?.Invoke(new DBusMessageWriter(message));
        }
        catch
        {
            Interop.SdBus.sd_bus_message_unref(message);
            throw;
        }
        return message;
    }

    private static ulong ToMicroseconds(TimeSpan timeout) =>
        timeout <= TimeSpan.Zero ? throw new ArgumentOutOfRangeException(nameof(timeout), "a D-Bus call needs a positive timeout")
        : (ulong)(timeout.Ticks / TimeSpan.TicksPerMicrosecond);

    private static DBusException ErrorFrom(Interop.SdBus.SdBusError* error, int errno, string operation)
    {
        string? name = Interop.SdBus.PtrToString(error->Name);
        return name is null
            ? DBusException.FromErrno(errno, operation)
            : new DBusException(name, Interop.SdBus.PtrToString(error->Message) ?? "");
    }

    [UnmanagedCallersOnly]
    private static int OnReply(nint reply, nint userdata, Interop.SdBus.SdBusError* retError)
    {
        GCHandle state = GCHandle.FromIntPtr(userdata);
        if (state.Target is PendingCall pending && pending.Owner is { } owner)
        {
            owner._pendingCalls.Remove(pending);
        }
        try
        {
            (state.Target as PendingCall)?.Complete(reply);
        }
        finally
        {
            state.Free();
        }
        return 1;
    }

    /// <summary>Exports <paramref name="obj"/>; dispose the result to remove it. Calls are served by the processing thread.</summary>
    public IDisposable Export(DBusObject obj)
    {
        ArgumentNullException.ThrowIfNull(obj);
        return RunOnBus(() =>
        {
            ThrowIfClosed();
            var registration = new ExportRegistration(this, obj);
            try
            {
                nint slot;
                Interop.SdBus.Check(Interop.SdBus.sd_bus_add_object_vtable(_bus, &slot, obj.Path, obj.Interface,
                    registration.Vtable.Entries, GCHandle.ToIntPtr(registration.State)), $"export {obj.Interface} at {obj.Path}");
                registration.Slot = slot;
            }
            catch
            {
                registration.FreeNative();
                throw;
            }
            _registrations.Add(registration);
            return (IDisposable)registration;
        });
    }

    /// <summary>
    /// Subscribes to signals matching the given fields (null = any). <paramref name="handler"/> runs
    /// on the processing thread; exceptions from it are swallowed (the signal is simply not handled).
    /// </summary>
    public IDisposable SubscribeSignal(string? sender, string? path, string? interfaceName, string? member, Action<DBusSignal> handler)
    {
        ArgumentNullException.ThrowIfNull(handler);
        return RunOnBus(() =>
        {
            ThrowIfClosed();
            var registration = new SignalRegistration(this, handler);
            try
            {
                nint slot;
                Interop.SdBus.Check(Interop.SdBus.sd_bus_match_signal(_bus, &slot, sender, path, interfaceName, member,
                    &OnSignal, GCHandle.ToIntPtr(registration.State)), "add signal match");
                registration.Slot = slot;
            }
            catch
            {
                registration.FreeNative();
                throw;
            }
            _registrations.Add(registration);
            return (IDisposable)registration;
        });
    }

    [UnmanagedCallersOnly]
    private static int OnSignal(nint message, nint userdata, Interop.SdBus.SdBusError* retError)
    {
        try
        {
            if (GCHandle.FromIntPtr(userdata).Target is SignalRegistration registration)
            {
                registration.Handler(new DBusSignal(message));
            }
        }
        catch (Exception)
        {
            // A subscriber's failure must not unwind into sd-bus; other subscribers still see the signal.
        }
        return 0;
    }

    [UnmanagedCallersOnly]
    private static int OnMethod(nint message, nint userdata, Interop.SdBus.SdBusError* retError)
    {
        DBusMethodCall? call = null;
        try
        {
            if (GCHandle.FromIntPtr(userdata).Target is not ExportRegistration registration)
            {
                return Interop.SdBus.sd_bus_error_set(retError, DBusErrorNames.Failed, "object is being removed");
            }
            string member = Interop.SdBus.PtrToString(Interop.SdBus.sd_bus_message_get_member(message)) ?? "";
            DBusMethodDefinition? method = registration.Object.Methods.FirstOrDefault(m => m.Name == member);
            if (method is null)
            {
                return Interop.SdBus.sd_bus_error_set(retError, DBusErrorNames.UnknownMethod, $"no method {member}");
            }
            call = new DBusMethodCall(registration.Connection, message, method);
            method.Handler(call);
            if (!call.Answered)
            {
                if (method.OutSignature.Length != 0)
                {
                    return Interop.SdBus.sd_bus_error_set(retError, DBusErrorNames.Failed, $"{member}: the handler returned without a reply");
                }
                call.Reply();
            }
            return 1;
        }
        catch (DBusException e) when (e.Errno == 0 && call is { Answered: false })
        {
            return Interop.SdBus.sd_bus_error_set(retError, e.ErrorName, e.ErrorMessage);
        }
        catch (Exception e) when (call is null or { Answered: false })
        {
            return Interop.SdBus.sd_bus_error_set(retError, DBusErrorNames.Failed, e.Message);
        }
        catch (Exception)
        {
            // Already answered: nothing more can be sent for this call.
            return 1;
        }
        finally
        {
            call?.Invalidate();
        }
    }

    /// <summary>Starts the processing thread (incoming calls, signals, async replies). Idempotent.</summary>
    public void StartProcessing()
    {
        lock (_gate)
        {
            ThrowIfClosed();
            if (_thread is not null)
            {
                return;
            }
            _wakeFd = Interop.Libc.EventFd(0, Interop.Libc.EfdCloexec | Interop.Libc.EfdNonblock);
            if (_wakeFd < 0)
            {
                throw DBusException.FromErrno(Marshal.GetLastPInvokeError(), "eventfd");
            }
            _thread = new Thread(ProcessLoop) { IsBackground = true, Name = "sd-bus" };
            _thread.Start();
        }
    }

    /// <summary>Runs <paramref name="action"/> with exclusive use of the bus, then wakes the processing thread.</summary>
    internal void RunOnBus(Action action) => RunOnBus(() =>
    {
        action();
        return true;
    });

    internal T RunOnBus<T>(Func<T> action)
    {
        lock (_gate)
        {
            T result = action();
            Wake();
            return result;
        }
    }

    internal void ThrowIfClosed() => ObjectDisposedException.ThrowIf(_bus == 0, this);

    /// <summary>
    /// Makes the processing thread re-run sd_bus_process: another thread may have queued
    /// outgoing data, or read incoming messages into sd-bus's queue while waiting for its reply.
    /// </summary>
    internal void Wake()
    {
        // Under the lock, so Dispose cannot close the eventfd (and the number be reused) meanwhile.
        lock (_gate)
        {
            if (_wakeFd >= 0 && Thread.CurrentThread != _thread)
            {
                ulong one = 1;
                Interop.Libc.Write(_wakeFd, &one, sizeof(ulong));
            }
        }
    }

    private void ProcessLoop()
    {
        Interop.Libc.PollFd* fds = stackalloc Interop.Libc.PollFd[2];
        while (!_stopping)
        {
            int timeoutMs;
            lock (_gate)
            {
                if (_bus == 0)
                {
                    return;
                }
                int rc;
                while ((rc = Interop.SdBus.sd_bus_process(_bus, null)) > 0)
                {
                }
                if (rc < 0)
                {
                    RaiseDisconnected(-rc);
                    return;
                }
                fds[0].Fd = Interop.SdBus.sd_bus_get_fd(_bus);
                int events = Interop.SdBus.sd_bus_get_events(_bus);
                if (fds[0].Fd < 0 || events < 0)
                {
                    RaiseDisconnected(fds[0].Fd < 0 ? -fds[0].Fd : -events);
                    return;
                }
                fds[0].Events = (short)events;
                ulong until;
                timeoutMs = -1;
                if (Interop.SdBus.sd_bus_get_timeout(_bus, &until) >= 0 && until != ulong.MaxValue)
                {
                    ulong now = Interop.Libc.MonotonicMicroseconds();
                    timeoutMs = until <= now ? 0 : (int)Math.Min(int.MaxValue, (until - now + 999) / 1000);
                }
            }
            fds[1].Fd = _wakeFd;
            fds[1].Events = Interop.Libc.PollIn;
            fds[0].Revents = fds[1].Revents = 0;
            Interop.Libc.Poll(fds, 2, timeoutMs);
            if ((fds[1].Revents & Interop.Libc.PollIn) != 0)
            {
                ulong value;
                Interop.Libc.Read(_wakeFd, &value, sizeof(ulong));
            }
        }
    }

    private void RaiseDisconnected(int errno)
    {
        try
        {
            Disconnected?.Invoke(DBusException.FromErrno(errno, "bus connection lost"));
        }
        catch (Exception)
        {
            // A handler's failure changes nothing: the connection is gone either way.
        }
    }

    /// <summary>Stops the processing thread, removes exports and subscriptions, fails pending calls and closes the connection.</summary>
    public void Dispose()
    {
        if (Thread.CurrentThread == _thread)
        {
            // sd_bus_process is on this thread's stack: freeing the bus here would pull it from under it.
            throw new InvalidOperationException("a DBusConnection cannot be disposed from its own handlers; dispose it from another thread");
        }
        _stopping = true;
        Wake();
        _thread?.Join(TimeSpan.FromSeconds(10));
        lock (_gate)
        {
            if (_bus == 0)
            {
                return;
            }
            foreach (Registration registration in _registrations.ToArray())
            {
                registration.Dispose();
            }
            Interop.SdBus.sd_bus_flush_close_unref(_bus);
            _bus = 0;
            // The bus is closed and nobody processes it any more: no reply callback can run now.
            foreach (PendingCall pending in _pendingCalls)
            {
                pending.Fail(new ObjectDisposedException(nameof(DBusConnection), "the connection was closed before the reply arrived"));
                pending.State.Free();
            }
            _pendingCalls.Clear();
            if (_wakeFd >= 0)
            {
                Interop.Libc.Close(_wakeFd);
                _wakeFd = -1;
            }
        }
    }

    private abstract class PendingCall
    {
        public GCHandle State { get; set; }

        public DBusConnection? Owner { get; set; }

        public abstract void Complete(nint reply);

        public abstract void Fail(Exception exception);
    }

    private sealed class PendingCall<T>(Func<DBusMessageReader, T> read, string operation) : PendingCall
    {
        private readonly TaskCompletionSource<T> _tcs = new(TaskCreationOptions.RunContinuationsAsynchronously);

        public Task<T> Task => _tcs.Task;

        public override void Complete(nint reply)
        {
            try
            {
                Interop.SdBus.SdBusError* error = Interop.SdBus.sd_bus_message_get_error(reply);
                if (Interop.SdBus.sd_bus_message_is_method_error(reply, 0) > 0 && error != null)
                {
                    _tcs.TrySetException(ErrorFrom(error, 5, $"call {operation}"));
                    return;
                }
                _tcs.TrySetResult(read(new DBusMessageReader(reply)));
            }
            catch (Exception e)
            {
                _tcs.TrySetException(e);
            }
        }

        public override void Fail(Exception exception) => _tcs.TrySetException(exception);
    }

    private abstract class Registration(DBusConnection connection) : IDisposable
    {
        private int _disposed;

        public DBusConnection Connection { get; } = connection;

        public GCHandle State { get; protected init; }

        public nint Slot { get; set; }

        public virtual void FreeNative()
        {
            if (State.IsAllocated)
            {
                State.Free();
            }
        }

        public void Dispose()
        {
            if (Interlocked.Exchange(ref _disposed, 1) != 0)
            {
                return;
            }
            lock (Connection._gate)
            {
                // Unref'ing the slot unregisters; sd-bus will not call us with this userdata afterwards.
                if (Slot != 0)
                {
                    Interop.SdBus.sd_bus_slot_unref(Slot);
                    Slot = 0;
                }
                Connection._registrations.Remove(this);
                FreeNative();
            }
        }
    }

    private sealed class ExportRegistration : Registration
    {
        public ExportRegistration(DBusConnection connection, DBusObject obj) : base(connection)
        {
            Object = obj;
            Vtable = new NativeVtable(obj, &OnMethod);
            State = GCHandle.Alloc(this);
        }

        public DBusObject Object { get; }

        public NativeVtable Vtable { get; }

        public override void FreeNative()
        {
            base.FreeNative();
            Vtable.Dispose();
        }
    }

    private sealed class SignalRegistration : Registration
    {
        public SignalRegistration(DBusConnection connection, Action<DBusSignal> handler) : base(connection)
        {
            Handler = handler;
            State = GCHandle.Alloc(this);
        }

        public Action<DBusSignal> Handler { get; }
    }
}
