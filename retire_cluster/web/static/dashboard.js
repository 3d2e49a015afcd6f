/* retire-cluster dashboard: a terminal-style command line over the main node's HTTP API.
 *
 * Commands run on the main node (POST /api/v1/command) and come back as text (ASCII
 * tables, progress bars) and JSON; `watch` and `logs` are live here, over the
 * /stream/... Server-Sent Events. The streams are read with fetch() rather than
 * EventSource because EventSource cannot send the Authorization header; they resume
 * with Last-Event-ID after a drop, as EventSource would.
 *
 * Kept in the browser: the token in sessionStorage (gone when the tab closes), the
 * command history and the theme in localStorage. Everything shown is set with
 * textContent: device and task fields come from the network and are never HTML.
 */
(function () {
  "use strict";

  var THEMES = ["matrix", "amber", "blue"];
  var COMMANDS = ["help", "status", "devices", "grid", "tasks", "task", "submit", "cancel", "watch",
                  "logs", "clear", "theme", "history", "logout"];
  // The commands the page runs by itself: how many words they take, and their usage.
  var PAGE_ONLY = { clear: [0, "clear"], theme: [1, "theme matrix|amber|blue"], history: [0, "history"],
                    logout: [0, "logout"] };
  var TASK_STATES = ["pending", "assigned", "running", "completed", "failed", "cancelled", "timeout"];
  var TERMINAL = { completed: 1, failed: 1, cancelled: 1, timeout: 1 };
  var HISTORY_KEY = "rc-history", THEME_KEY = "rc-theme", TOKEN_KEY = "rc-token";
  var HISTORY_MAX = 500;

  var out = document.getElementById("output");
  var input = document.getElementById("input");
  var form = document.getElementById("promptline");
  var promptEl = document.getElementById("prompt");

  var state = {
    authRequired: true,
    askingToken: false,
    devices: {},          // device_id -> record
    tasks: {},            // task_id -> newest record seen
    taskOrder: [],        // task ids, newest first (for completion)
    streams: {},          // name -> controller
    live: null,           // the running watch / logs view
    history: loadHistory(),
    historyPos: -1,
    draft: ""
  };
  // What tests (and curious people, in the console) can look at.
  var rc = window.rc = { stats: { events: { devices: 0, tasks: 0, logs: 0 }, keepalives: 0, resets: 0 },
                         state: state };

  // -- output ---------------------------------------------------------------

  function print(text, cls) {
    var pre = document.createElement("pre");
    if (cls) pre.className = cls;
    pre.textContent = text;
    out.appendChild(pre);
    out.scrollTop = out.scrollHeight;
    return pre;
  }

  function appendTo(pre, line) {
    pre.textContent += (pre.textContent ? "\n" : "") + line;
    out.scrollTop = out.scrollHeight;
  }

  function bar(fraction, width) {
    width = width || 20;
    if (fraction === null || fraction === undefined || isNaN(fraction)) {
      return "[" + "?".repeat(width) + "]    ?";
    }
    fraction = Math.max(0, Math.min(1, fraction));
    var filled = Math.round(fraction * width);
    var pct = String(Math.round(fraction * 100));
    return "[" + "#".repeat(filled) + "-".repeat(width - filled) + "] " + " ".repeat(3 - pct.length) + pct + "%";
  }

  function taskBar(t) {
    if (t.status === "completed") return bar(1);
    if (TERMINAL[t.status]) return "[" + "x".repeat(20) + "] " + t.status;
    if (t.status === "running") return bar(typeof t.progress === "number" ? t.progress / 100 : null);
    return bar(0);
  }

  function clock() {
    var d = new Date();
    return [d.getHours(), d.getMinutes(), d.getSeconds()].map(function (n) {
      return (n < 10 ? "0" : "") + n;
    }).join(":");
  }

  // -- talking to the main node -----------------------------------------------

  function token() { return sessionStorage.getItem(TOKEN_KEY); }

  function headers(extra) {
    var h = extra || {};
    if (token()) h.Authorization = "Bearer " + token();
    return h;
  }

  function ApiError(status, body) {
    this.status = status;
    this.code = (body && body.code) || "http_" + status;
    this.message = (body && body.error) || ("HTTP " + status);
  }

  function api(method, path, body) {
    var init = { method: method, headers: headers({ Accept: "application/json" }), cache: "no-store" };
    if (body !== undefined) {
      init.headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    return fetch(path, init).then(function (resp) {
      return resp.text().then(function (text) {
        var data = null;
        try { data = text ? JSON.parse(text) : null; } catch (e) { data = { error: text }; }
        if (!resp.ok) {
          var err = new ApiError(resp.status, data);
          if (resp.status === 401) onUnauthorized();
          throw err;
        }
        return data;
      });
    });
  }

  /* One Server-Sent Events stream read with fetch(); reconnects with Last-Event-ID. */
  function openStream(name, query, onEvent) {
    var ctl = { stopped: false, lastId: null, abort: null };
    ctl.stop = function () { ctl.stopped = true; if (ctl.abort) ctl.abort.abort(); };

    function dispatch(block) {
      var event = "message", data = [], id = null;
      block.split("\n").forEach(function (line) {
        if (line.charAt(0) === ":") { rc.stats.keepalives++; return; }
        var colon = line.indexOf(":");
        var field = colon < 0 ? line : line.slice(0, colon);
        var value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
        if (field === "id") id = value;
        else if (field === "event") event = value;
        else if (field === "data") data.push(value);
      });
      if (id !== null) ctl.lastId = id;
      if (!data.length) return;
      var payload;
      try { payload = JSON.parse(data.join("\n")); } catch (e) { return; }
      if (rc.stats.events[name] !== undefined) rc.stats.events[name]++;
      if (event === "reset") rc.stats.resets++;
      onEvent(event, payload);
    }

    (function loop(delay) {
      if (ctl.stopped) return;
      ctl.abort = new AbortController();
      var h = headers({ Accept: "text/event-stream" });
      if (ctl.lastId !== null) h["Last-Event-ID"] = ctl.lastId;
      fetch("/stream/" + name + (query || ""), { headers: h, signal: ctl.abort.signal, cache: "no-store" })
        .then(function (resp) {
          if (resp.status === 401) { onUnauthorized(); ctl.stopped = true; return; }
          if (!resp.ok || !resp.body) throw new Error("HTTP " + resp.status);
          delay = 500;
          ctl.up = true;
          setConn();
          var reader = resp.body.getReader(), decoder = new TextDecoder(), buf = "";
          function pump() {
            return reader.read().then(function (r) {
              if (r.done) return;
              buf += decoder.decode(r.value, { stream: true }).replace(/\r\n?/g, "\n");
              var i;
              while ((i = buf.indexOf("\n\n")) >= 0) {
                dispatch(buf.slice(0, i));
                buf = buf.slice(i + 2);
              }
              return pump();
            });
          }
          return pump();
        })
        .catch(function () { /* dropped: retried below */ })
        .then(function () {
          ctl.up = false;
          setConn();
          if (!ctl.stopped) setTimeout(function () { loop(Math.min(delay * 2, 10000)); }, delay);
        });
    })(500);
    return ctl;
  }

  function setConn() {
    var el = document.getElementById("conn");
    var names = Object.keys(state.streams);
    var up = names.length > 0 && names.every(function (k) { return state.streams[k].up; });
    el.textContent = up ? "live" : "offline";
    el.className = "conn " + (up ? "on" : "off");
  }

  // -- token ----------------------------------------------------------------

  function askToken(why) {
    state.askingToken = true;
    if (why) print(why, "err");
    print("This main node needs its cluster token (`retire-cluster token` on the main node prints it).\n" +
          "It is kept in this tab's session storage only.", "dim");
    promptEl.textContent = "token:";
    input.type = "password";
    input.value = "";
    input.focus();
  }

  function tryToken(value) {
    sessionStorage.setItem(TOKEN_KEY, value.trim());
    api("GET", "/api/v1/cluster/status").then(function () {
      state.askingToken = false;
      promptEl.textContent = "rc>";
      input.type = "text";
      startSession();
    }, function (err) {
      if (err.status !== 401) { print("error: " + err.message, "err"); }
    });
  }

  function onUnauthorized() {
    if (state.askingToken) {
      sessionStorage.removeItem(TOKEN_KEY);
      print("That token was refused; try again.", "err");
      return;
    }
    stopStreams();
    sessionStorage.removeItem(TOKEN_KEY);
    if (state.authRequired) askToken("The main node refused the token.");
  }

  // -- the session --------------------------------------------------------------

  function startSession() {
    print("retire-cluster dashboard. Type `help`; Tab completes commands and ids; up/down walks the history.",
          "dim");
    refreshDevices();
    refreshTasks();
    stopStreams();
    state.streams.devices = openStream("devices", "", onDeviceEvent);
    state.streams.tasks = openStream("tasks", "", onTaskEvent);
    setConn();
    run("status", true);
  }

  function stopStreams() {
    Object.keys(state.streams).forEach(function (k) { state.streams[k].stop(); });
    state.streams = {};
    stopLive();
    setConn();
  }

  function refreshDevices() {
    return api("GET", "/api/v1/devices").then(function (data) {
      state.devices = {};
      data.devices.forEach(function (d) { state.devices[d.device_id] = d; });
      drawGrid();
    }, function () {});
  }

  function refreshTasks() {
    return api("GET", "/api/v1/tasks?limit=200").then(function (data) {
      data.tasks.slice().reverse().forEach(rememberTask);
    }, function () {});
  }

  function rememberTask(t) {
    if (!t || typeof t.task_id !== "string" || t.status === undefined) return;
    if (!state.tasks[t.task_id]) state.taskOrder.unshift(t.task_id);
    state.tasks[t.task_id] = t;
    if (state.taskOrder.length > 1000) {
      var gone = state.taskOrder.pop();
      delete state.tasks[gone];
    }
  }

  function onDeviceEvent(event, data) {
    if (event === "snapshot") {
      state.devices = {};
      data.devices.forEach(function (d) { state.devices[d.device_id] = d; });
    } else if (event === "device") {
      state.devices[data.device_id] = data;
    } else if (event === "forget") {
      delete state.devices[data.device_id];
    } else if (event === "reset") {
      refreshDevices();
      return;
    }
    drawGrid();
  }

  function onTaskEvent(event, data) {
    if (event === "reset") { refreshTasks(); return; }
    if (event !== "task") return;
    rememberTask(data);
    if (state.live && state.live.onTask) state.live.onTask(data);
  }

  // -- the device grid ----------------------------------------------------------

  var gridPending = false;
  function drawGrid() {
    if (gridPending) return;
    gridPending = true;
    requestAnimationFrame(function () { gridPending = false; renderGrid(); });
  }

  function meter(label, fraction, text) {
    var m = document.createElement("div");
    m.className = "meter";
    var l = document.createElement("span"); l.className = "label"; l.textContent = label;
    var track = document.createElement("span"); track.className = "track";
    var fill = document.createElement("span"); fill.className = "fill";
    fill.style.display = "block";
    fill.style.width = (fraction === null ? 0 : Math.round(Math.max(0, Math.min(1, fraction)) * 100)) + "%";
    track.appendChild(fill);
    var v = document.createElement("span"); v.className = "value"; v.textContent = text;
    m.appendChild(l); m.appendChild(track); m.appendChild(v);
    return m;
  }

  function num(x) { return typeof x === "number" && isFinite(x) ? x : null; }

  function renderGrid() {
    var grid = document.getElementById("grid");
    var ids = Object.keys(state.devices).sort();
    grid.textContent = "";
    var online = 0, busy = 0, slots = 0;
    if (!ids.length) {
      var p = document.createElement("p"); p.className = "dim"; p.textContent = "no devices yet";
      grid.appendChild(p);
    }
    ids.forEach(function (id) {
      var d = state.devices[id], m = d.system_metrics || {};
      var st = d.status;
      if (st === "online" && d.connected === false) st = "away";
      else if (st === "online" && d.accepting === false) st = "paused";
      if (d.status === "online") { online++; busy += d.active_tasks || 0; slots += d.max_concurrent_tasks || 0; }
      var card = document.createElement("div");
      card.className = "device " + st;
      card.setAttribute("data-device-id", id);
      card.title = (d.device_info && d.device_info.platform || "?") + " " +
                   (d.device_info && d.device_info.architecture || "") + ", role " +
                   (d.device_info && d.device_info.role || "-") + (d.reason ? "\n" + d.reason : "");
      var name = document.createElement("div"); name.className = "name"; name.textContent = id;
      var state_ = document.createElement("div"); state_.className = "state"; state_.textContent = st +
        "  " + (d.active_tasks || 0) + "/" + (d.max_concurrent_tasks || 0) + " tasks";
      card.appendChild(name); card.appendChild(state_);
      var battery = num(m.battery_percent), cpu = num(m.cpu_usage);
      card.appendChild(meter("bat", battery === null ? null : battery / 100,
                             battery === null ? "-" : Math.round(battery) + "%" + (m.charging ? "+" : "")));
      card.appendChild(meter("cpu", cpu === null ? null : cpu / 100, cpu === null ? "-" : Math.round(cpu) + "%"));
      grid.appendChild(card);
    });
    document.getElementById("summary").textContent =
      online + "/" + ids.length + " devices online, " + busy + "/" + slots + " slots busy";
  }

  // -- live views: watch and logs ---------------------------------------------------

  function stopLive(note) {
    if (!state.live) return;
    if (state.live.stream) state.live.stream.stop();
    if (note) appendTo(state.live.pre, note);
    state.live = null;
  }

  function taskLine(t) {
    return clock() + "  " + t.task_id + "  " + (t.task_type || "") + "  " + pad(t.status, 9) + " " + taskBar(t) +
           (t.assigned_device ? "  on " + t.assigned_device : "");
  }

  function pad(s, n) { s = String(s); return s + " ".repeat(Math.max(0, n - s.length)); }

  function finished(t) {
    var lines = [t.task_id + " " + t.status + (typeof t.execution_time === "number"
      ? " in " + t.execution_time.toFixed(3) + " s" : "")];
    var result = t.result || {};
    if (result.output !== undefined && result.output !== null) lines.push("output: " + result.output);
    if (t.error) lines.push("error: " + t.error);
    return lines.join("\n");
  }

  function watchTask(taskId) {
    stopLive();
    var pre = print("watching " + taskId + " (Esc or Ctrl-C stops)", "live");
    var last = null;
    var live = state.live = { pre: pre, taskId: taskId };
    live.onTask = function (t) {
      if (t.task_id !== taskId) return;
      var key = t.status + "/" + t.progress + "/" + t.attempt;
      if (key === last) return;
      last = key;
      appendTo(pre, taskLine(t));
      if (TERMINAL[t.status]) {
        appendTo(pre, finished(t));
        state.live = null;
      }
    };
    if (state.tasks[taskId]) live.onTask(state.tasks[taskId]);
  }

  function watchAll() {
    stopLive();
    var pre = print("watching every task (Esc or Ctrl-C stops)", "live");
    state.live = { pre: pre, onTask: function (t) { appendTo(pre, taskLine(t)); } };
  }

  function watchLogs() {
    stopLive();
    var pre = print("the main node's log, live (Esc or Ctrl-C stops)", "live");
    var live = state.live = { pre: pre };
    live.stream = openStream("logs", "?level=info", function (event, e) {
      if (event === "log") appendTo(pre, e.time + " " + pad(e.level.toUpperCase(), 7) + " " + e.logger + ": " +
                                          e.message);
    });
  }

  // -- commands -------------------------------------------------------------------

  function run(line, quiet) {
    line = line.trim();
    if (!quiet) print("rc> " + line, "echo");
    if (!line) return Promise.resolve();
    var words = line.split(/\s+/), name = words[0].toLowerCase();
    if (state.live && !(name === "watch" || name === "logs")) stopLive("(stopped)");
    var takes = Object.prototype.hasOwnProperty.call(PAGE_ONLY, name) ? PAGE_ONLY[name] : null;
    if (takes && words.length > takes[0] + 1) {  // as the main node answers for its commands
      print("error (invalid_message): unexpected word '" + words[takes[0] + 1] + "' after `" +
            words.slice(0, takes[0] + 1).join(" ") + "`; usage: " + takes[1], "err");
      return Promise.resolve();
    }
    if (name === "clear") { out.textContent = ""; return Promise.resolve(); }
    if (name === "theme") { setTheme(words[1]); return Promise.resolve(); }
    if (name === "history") {
      print(state.history.map(function (h, i) { return pad(i + 1, 5) + h; }).join("\n") || "(empty)");
      return Promise.resolve();
    }
    if (name === "logout") {
      stopStreams();
      sessionStorage.removeItem(TOKEN_KEY);
      if (state.authRequired) askToken(); else print("nothing to forget: this main node runs --insecure", "dim");
      return Promise.resolve();
    }
    var pending = print("...", "dim");
    return api("POST", "/api/v1/command", { command: line }).then(function (res) {
      pending.className = "";
      pending.textContent = res.text;
      var data = res.json || {};
      if (Array.isArray(data.tasks)) data.tasks.forEach(rememberTask);
      if (data.task) rememberTask(data.task);
      if (Array.isArray(data.devices)) {
        res.json.devices.forEach(function (d) { state.devices[d.device_id] = d; });
        drawGrid();
      }
      var action = res.action || {};
      if (action.watch !== undefined) {
        if (action.watch) watchTask(action.watch); else watchAll();
      } else if (action.logs) {
        watchLogs();
      }
      out.scrollTop = out.scrollHeight;
    }, function (err) {
      pending.className = "err";
      pending.textContent = "error (" + err.code + "): " + err.message;
    });
  }

  function setTheme(name) {
    if (THEMES.indexOf(name) < 0) {
      print("themes: " + THEMES.join(", "), "err");
      return;
    }
    THEMES.forEach(function (t) { document.body.classList.remove("theme-" + t); });
    document.body.classList.add("theme-" + name);
    localStorage.setItem(THEME_KEY, name);
    Array.prototype.forEach.call(document.querySelectorAll("[data-theme]"), function (b) {
      b.classList.toggle("active", b.getAttribute("data-theme") === name);
    });
  }

  // -- history ----------------------------------------------------------------------

  function loadHistory() {
    try {
      var h = JSON.parse(localStorage.getItem(HISTORY_KEY) || "[]");
      return Array.isArray(h) ? h.filter(function (x) { return typeof x === "string"; }) : [];
    } catch (e) { return []; }
  }

  function remember(line) {
    if (!line || state.history[state.history.length - 1] === line) return;
    state.history.push(line);
    if (state.history.length > HISTORY_MAX) state.history.splice(0, state.history.length - HISTORY_MAX);
    localStorage.setItem(HISTORY_KEY, JSON.stringify(state.history));
  }

  function walkHistory(step) {
    var h = state.history;
    if (!h.length) return;
    if (state.historyPos === -1) { state.draft = input.value; state.historyPos = h.length; }
    var pos = state.historyPos + step;
    if (pos < 0) pos = 0;
    if (pos >= h.length) { state.historyPos = -1; input.value = state.draft; return; }
    state.historyPos = pos;
    input.value = h[pos];
    input.setSelectionRange(input.value.length, input.value.length);
  }

  // -- tab completion -------------------------------------------------------------------

  function taskTypes() {
    var seen = {};
    Object.keys(state.devices).forEach(function (id) {
      (state.devices[id].task_types || []).forEach(function (t) { seen[t] = 1; });
    });
    return Object.keys(seen).sort();
  }

  function candidates(words) {
    var n = words.length, cmd = words[0].toLowerCase(), prev = words[n - 2];
    if (n === 1) return COMMANDS;
    if (prev === "--device") return Object.keys(state.devices).sort();
    if (prev === "--type") return taskTypes();
    if (n === 2) {
      if (cmd === "task" || cmd === "cancel" || cmd === "watch") {
        var ids = state.taskOrder.slice();
        if (cmd === "cancel") ids = ids.filter(function (id) { return !TERMINAL[state.tasks[id].status]; });
        return ids;
      }
      if (cmd === "devices") return ["online", "offline"];
      if (cmd === "tasks") return TASK_STATES;
      if (cmd === "theme") return THEMES;
      if (cmd === "submit") return taskTypes();
    }
    return [];
  }

  function commonPrefix(list) {
    return list.reduce(function (a, b) {
      var i = 0;
      while (i < a.length && i < b.length && a[i] === b[i]) i++;
      return a.slice(0, i);
    });
  }

  function complete() {
    var value = input.value.slice(0, input.selectionStart), rest = input.value.slice(input.selectionStart);
    var words = value.split(/\s+/);
    if (words[0] === "") words.shift();
    if (!words.length) words = [""];
    var word = words[words.length - 1];
    var matches = candidates(words).filter(function (c) { return c.indexOf(word) === 0; });
    if (!matches.length) return;
    var head = value.slice(0, value.length - word.length);
    var completed = matches.length === 1 ? matches[0] + " " : commonPrefix(matches);
    if (matches.length > 1 && completed === word) {
      print(matches.slice(0, 60).join("  ") + (matches.length > 60 ? "  ..." : ""), "dim");
      return;
    }
    input.value = head + completed + rest;
    var caret = (head + completed).length;
    input.setSelectionRange(caret, caret);
  }

  // -- keyboard -----------------------------------------------------------------------

  form.addEventListener("submit", function (ev) {
    ev.preventDefault();
    var line = input.value;
    input.value = "";
    state.historyPos = -1;
    if (state.askingToken) {
      if (line.trim()) tryToken(line);
      return;
    }
    remember(line.trim());
    run(line);
  });

  input.addEventListener("keydown", function (ev) {
    if (state.askingToken) return;
    if (ev.key === "Tab") { ev.preventDefault(); complete(); }
    else if (ev.key === "ArrowUp") { ev.preventDefault(); walkHistory(-1); }
    else if (ev.key === "ArrowDown") { ev.preventDefault(); walkHistory(1); }
    else if (ev.key === "Escape" || (ev.ctrlKey && ev.key === "c" && !input.value)) {
      if (state.live) { ev.preventDefault(); stopLive("^C"); }
    } else if (ev.ctrlKey && ev.key === "l") { ev.preventDefault(); out.textContent = ""; }
  });

  document.addEventListener("click", function (ev) {
    var theme = ev.target.getAttribute && ev.target.getAttribute("data-theme");
    if (theme) { setTheme(theme); input.focus(); }
    else if (!window.getSelection().toString() && ev.target.closest && ev.target.closest("#terminal")) input.focus();
  });

  // -- start -------------------------------------------------------------------------------

  setTheme(THEMES.indexOf(localStorage.getItem(THEME_KEY)) >= 0 ? localStorage.getItem(THEME_KEY) : "matrix");
  fetch("/api/v1/health", { cache: "no-store" }).then(function (r) { return r.json(); }).then(function (h) {
    state.authRequired = !!h.auth;
    print("main node " + h.version + ", up " + Math.round(h.uptime) + " s, database " + h.database, "dim");
    if (h.auth && !token()) { askToken(); return; }
    if (!h.auth) { startSession(); return; }
    // A token from earlier in this tab: check it still works.
    api("GET", "/api/v1/cluster/status").then(startSession, function () {});
  }, function () {
    print("cannot reach the main node's HTTP API; reload when it is up.", "err");
  });
})();
