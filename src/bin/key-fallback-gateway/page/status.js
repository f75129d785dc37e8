// The status page: every route's keys from GET /keys, redrawn every 2 s, with the time to
// recovery counted down every second in between; reset buttons (POST /keys/reset,
// POST /keys/{label}/reset) send the admin token when one is typed in. Nothing here ever
// sees a key: /keys answers labels and fingerprints.
"use strict";

const token = document.getElementById("token");
token.value = sessionStorage.getItem("gateway-admin-token") || "";
token.addEventListener("input", () => sessionStorage.setItem("gateway-admin-token", token.value));

let fetchedAt = 0;
let last = null;

function headers() {
  return token.value ? { authorization: "Bearer " + token.value } : {};
}

function seconds(ms) {
  const s = Math.max(0, Math.ceil(ms / 1000));
  if (s >= 3600) return Math.floor(s / 3600) + " h " + Math.floor((s % 3600) / 60) + " min";
  if (s >= 60) return Math.floor(s / 60) + " min " + (s % 60) + " s";
  return s + " s";
}

function cell(row, text, cls) {
  const td = row.insertCell();
  td.textContent = text;
  if (cls) td.className = cls;
  return td;
}

function draw() {
  if (!last) return;
  const elapsed = Date.now() - fetchedAt;
  const routes = last.routes ? Object.entries(last.routes) : [["", last]];
  const main = document.getElementById("routes");
  main.replaceChildren();
  let usable = 0, total = 0;
  for (const [name, pool] of routes) {
    if (name) {
      const h = document.createElement("h2");
      h.textContent = "Route " + name;
      main.append(h);
    }
    const table = document.createElement("table");
    table.createTHead().insertRow().append(
      ...["Key", "State", "Reason", "Back in", "Requests", "Served", "429s", "Errors", ""].map((t) => {
        const th = document.createElement("th");
        th.textContent = t;
        return th;
      })
    );
    const body = table.createTBody();
    for (const key of pool.keys) {
      total += 1;
      if (key.available) usable += 1;
      const row = body.insertRow();
      row.dataset.label = key.label;
      row.dataset.state = key.state;
      cell(row, key.label);
      cell(row, key.state.replace("_", " "), "state state-" + key.state);
      cell(row, key.reason || "", "reason");
      const left = key.remaining_ms == null ? "" : seconds(key.remaining_ms - elapsed);
      cell(row, left, "countdown");
      cell(row, key.requests, "num");
      cell(row, key.successes, "num");
      cell(row, key.rate_limited, "num");
      cell(row, key.errors, "num");
      const button = document.createElement("button");
      button.type = "button";
      button.textContent = "Reset";
      button.addEventListener("click", () => reset("/keys/" + encodeURIComponent(key.label) + "/reset"));
      row.insertCell().append(button);
    }
    main.append(table);
  }
  document.getElementById("summary").textContent =
    usable + " of " + total + " keys usable · updated " + new Date(fetchedAt).toLocaleTimeString();
}

async function load() {
  try {
    const res = await fetch("/keys", { headers: headers() });
    if (!res.ok) {
      const body = await res.json().catch(() => ({}));
      document.getElementById("summary").textContent =
        "GET /keys: " + res.status + " " + ((body.error && body.error.message) || "");
      return;
    }
    last = await res.json();
    fetchedAt = Date.now();
    draw();
    const events = await fetch("/keys/switches", { headers: headers() });
    if (events.ok) {
      const list = document.getElementById("switches");
      list.replaceChildren(
        ...(await events.json()).switches.map((s) => {
          const li = document.createElement("li");
          li.textContent = new Date(s.at_ms).toLocaleTimeString() + " " + (s.route ? s.route + ": " : "") +
            s.from + " → " + s.to + " (" + s.reason + ")";
          return li;
        })
      );
    }
  } catch (e) {
    document.getElementById("summary").textContent = "The gateway does not answer: " + e;
  }
}

async function reset(path) {
  const res = await fetch(path, { method: "POST", headers: headers() });
  document.getElementById("message").textContent = res.ok ? "Reset." : "Reset refused: " + res.status;
  await load();
}

document.getElementById("reset-all").addEventListener("click", () => reset("/keys/reset"));
load();
setInterval(load, 2000);
setInterval(draw, 1000);
