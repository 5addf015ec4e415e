// The operator console: three pages over the /v1 API, routed by the URL's hash.
//
//   #/?status=&days=     the fleet's charging efficiency, worst first, a page at a time
//   #/vehicles/{id}      one vehicle: its live reading (kept current by the stream), its
//                        sessions' efficiency as a chart, its meter assignments
//   #/alerts             open alerts, each with an Acknowledge button
//
// Everything is built with DOM calls and textContent, never innerHTML: device ids and
// messages are data, not markup. Any failure shows the API's own message; a refused
// token shows the token form instead.

import { ApiError, api, forgetToken, hasToken, setToken } from "./api.js";
import { follow } from "./sse.js";

const PAGE_SIZE = 50;
const SESSIONS_SHOWN = 50;
const STATUSES = ["fault", "anomalous", "insufficient_data", "normal", "unlinked"];
const WINDOWS = [
  ["", "Default window"],
  ["7", "Last 7 days"],
  ["30", "Last 30 days"],
];
const ALERT_KINDS = {
  charger_efficiency_low: "Charger efficiency low",
  meter_overreporting: "Meter over-reporting",
  battery_overheat: "Battery overheating",
  device_silent: "Device silent",
};

const main = document.getElementById("main");
const forgetButton = document.getElementById("forget-token");
let visit = 0; // bumped on every navigation: an answer for an older page is dropped
let leave = () => {}; // stops what the current page started (its stream)
let navigated = false; // the operator moved to another page: its heading gets the focus

// --- small helpers ------------------------------------------------------------------------

function h(tag, attrs = {}, ...children) {
  const element = document.createElement(tag);
  setAttributes(element, attrs);
  element.append(...children.flat().filter((c) => c !== null && c !== undefined && c !== false));
  return element;
}

function svg(tag, attrs = {}, ...children) {
  const element = document.createElementNS("http://www.w3.org/2000/svg", tag);
  setAttributes(element, attrs);
  element.append(...children);
  return element;
}

function setAttributes(element, attrs) {
  for (const [name, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) {
      continue;
    }
    if (name.startsWith("on")) {
      element.addEventListener(name.slice(2), value);
    } else {
      element.setAttribute(name, value === true ? "" : String(value));
    }
  }
}

function number(value, digits) {
  return value === null || value === undefined ? "—" : Number(value).toFixed(digits);
}

function when(instant) {
  if (!instant) {
    return "—";
  }
  const date = new Date(instant);
  return h(
    "time",
    { datetime: instant },
    date.toLocaleString(undefined, { dateStyle: "medium", timeStyle: "medium" }),
  );
}

function statusBadge(status) {
  // The word is always there: colour alone is not a signal everyone can see.
  return h("span", { class: `status status-${status}` }, status.replace("_", " "));
}

function vehicleLink(id) {
  return h("a", { href: `#/vehicles/${encodeURIComponent(id)}` }, id);
}

function table(caption, columns, body) {
  return h(
    "div",
    { class: "table-wrap" },
    h(
      "table",
      {},
      h("caption", {}, caption),
      h(
        "thead",
        {},
        h(
          "tr",
          {},
          columns.map(([label, numeric]) =>
            h("th", { scope: "col", class: numeric ? "num" : null }, label),
          ),
        ),
      ),
      body,
    ),
  );
}

// --- pages, errors and the token form ---------------------------------------------------------

function show(title, ...content) {
  document.title = `${title} · Fleet console`;
  const heading = h("h1", { tabindex: "-1" }, title);
  // A control that re-rendered its own page (a filter) keeps the focus; otherwise, after a
  // navigation, the heading takes it so a screen reader announces the new page.
  const focused = main.contains(document.activeElement) ? document.activeElement.id : "";
  main.replaceChildren(heading, ...content);
  forgetButton.hidden = !hasToken();
  const again = focused && document.getElementById(focused);
  if (again) {
    again.focus();
  } else if (navigated) {
    heading.focus(); // (a token form then moves it on to its field)
  }
  navigated = false;
}

// What a failure looks like: the token form when another token may help, else the API's
// message with a way to try again.
function failure(err, retry) {
  if (err instanceof ApiError && err.wantsToken) {
    return tokenForm(err, retry);
  }
  const code = err instanceof ApiError ? err.code : "console_error";
  return h(
    "div",
    { class: "error-box", role: "alert" },
    h("p", {}, err.message || String(err)),
    h("p", { class: "code" }, `(${code})`),
    h("button", { type: "button", onclick: retry }, "Try again"),
  );
}

function tokenForm(err, retry) {
  const input = h("input", {
    id: "token",
    name: "token",
    type: "password",
    autocomplete: "off",
    spellcheck: "false",
    required: true,
  });
  // method=post: were the submit handler ever skipped, the token would go in a body,
  // never in the URL as a GET form would put it.
  const form = h(
    "form",
    {
      class: "token-form",
      method: "post",
      "aria-labelledby": "token-title",
      onsubmit: (event) => {
        event.preventDefault();
        const token = input.value.trim();
        if (token) {
          setToken(token);
          retry();
        }
      },
    },
    h("h2", { id: "token-title" }, "An API token is needed"),
    h("p", { class: "error-text", role: "alert" }, err.message),
    h("label", { for: "token" }, "API token"),
    input,
    h("button", { type: "submit" }, "Use this token"),
    h(
      "p",
      { class: "hint" },
      "Kept in this browser tab only and sent in the Authorization header, never in a URL.",
    ),
  );
  // Focus once it is on the page (the caller puts it there).
  queueMicrotask(() => input.focus());
  return form;
}

function pageFailed(title, err) {
  show(title, failure(err, route));
}

// Load a pager's first page; false when it failed (the failure is shown) or the operator
// has gone to another page meanwhile (nothing is shown).
async function firstPage(rows, title) {
  const mine = visit;
  try {
    await rows.first();
  } catch (err) {
    if (mine === visit) pageFailed(title, err);
    return false;
  }
  return mine === visit;
}

// A table fed a page at a time: the first page at once, then "Load more" with nextCursor.
function pager({ load, row, empty, notice }) {
  const body = h("tbody");
  const more = h("button", { type: "button", class: "more", hidden: true }, "Load more");
  let cursor = null;
  let mine = visit;

  async function next() {
    more.disabled = true;
    try {
      const page = await load(cursor);
      if (mine !== visit) {
        return [];
      }
      const added = page.items.map(row);
      body.append(...added);
      if (!body.children.length) {
        body.append(h("tr", {}, h("td", { colspan: "99", class: "empty" }, empty)));
      }
      cursor = page.nextCursor;
      more.hidden = !cursor;
      notice.replaceChildren();
      return added;
    } finally {
      more.disabled = false;
    }
  }

  more.addEventListener("click", () =>
    next().then(
      (added) => {
        // The last page hides the button: keep the keyboard where the new rows start.
        const target = more.hidden && added.length && added[0].querySelector("a, button");
        if (target) target.focus();
      },
      (err) => notice.replaceChildren(failure(err, () => more.click())),
    ),
  );
  return {
    body,
    more,
    first() {
      mine = visit;
      body.replaceChildren();
      cursor = null;
      return next();
    },
  };
}

// --- #/ : the fleet --------------------------------------------------------------------------

function fleetHash(status, days) {
  const query = new URLSearchParams();
  if (status) query.set("status", status);
  if (days) query.set("days", days);
  const text = query.toString();
  return text ? `#/?${text}` : "#/";
}

async function fleetPage(params) {
  const status = STATUSES.includes(params.get("status")) ? params.get("status") : "";
  const days = WINDOWS.some(([value]) => value === params.get("days")) ? params.get("days") : "";
  const title = "Fleet efficiency";
  const notice = h("div", { class: "notice" });
  const covered = h("p", { class: "window" });
  const rows = pager({
    notice,
    empty: status
      ? `No vehicle is ${status.replace("_", " ")} in this window.`
      : "No linked vehicle has readings in this window.",
    row: (v) =>
      h(
        "tr",
        { "data-vehicle": v.vehicleId },
        h("th", { scope: "row" }, vehicleLink(v.vehicleId)),
        h("td", {}, statusBadge(v.status)),
        h("td", { class: "num ratio" }, number(v.efficiencyRatio, 4)),
        h("td", { class: "num" }, number(v.totalKwhDeliveredDc, 3)),
        h("td", { class: "num" }, number(v.totalKwhConsumedAc, 3)),
        h("td", {}, v.meterIds.join(", ")),
      ),
    load: async (cursor) => {
      // A cursor pins the window it came from: from/to go only with the first page.
      const query = cursor
        ? { status, limit: PAGE_SIZE, cursor }
        : {
            status,
            limit: PAGE_SIZE,
            from: days ? new Date(Date.now() - days * 86400000).toISOString() : "",
          };
      const page = await api("/v1/analytics/fleet/efficiency", { query });
      covered.replaceChildren(
        "From ",
        when(page.from),
        " to ",
        when(page.to),
        " (whole UTC hours).",
      );
      return { items: page.vehicles, nextCursor: page.nextCursor };
    },
  });

  const select = (id, label, options, value, onchange) =>
    h(
      "div",
      { class: "field" },
      h("label", { for: id }, label),
      h(
        "select",
        { id, onchange },
        options.map(([v, text]) => h("option", { value: v, selected: v === value }, text)),
      ),
    );
  const filters = h(
    "form",
    { class: "filters", "aria-label": "Filter the fleet", onsubmit: (e) => e.preventDefault() },
    select(
      "status-filter",
      "Status",
      [["", "Every status"], ...STATUSES.map((s) => [s, s.replace("_", " ")])],
      status,
      (e) => {
        window.location.hash = fleetHash(e.target.value, days);
      },
    ),
    select("window-filter", "Window", WINDOWS, days, (e) => {
      window.location.hash = fleetHash(status, e.target.value);
    }),
  );
  if (!(await firstPage(rows, title))) return;
  show(
    title,
    filters,
    covered,
    notice,
    table(
      "Vehicles, worst efficiency first",
      [
        ["Vehicle"],
        ["Status"],
        ["Efficiency (DC/AC)", true],
        ["DC delivered, kWh", true],
        ["AC consumed, kWh", true],
        ["Meters"],
      ],
      rows.body,
    ),
    rows.more,
  );
}

// --- #/vehicles/{id} ----------------------------------------------------------------------------

const LIVE_FIELDS = [
  ["soc", "State of charge", (r) => `${number(r.soc, 1)} %`],
  ["kwhDeliveredDc", "DC delivered, last interval", (r) => `${number(r.kwhDeliveredDc, 3)} kWh`],
  ["batteryTemp", "Battery temperature", (r) => `${number(r.batteryTemp, 1)} °C`],
  ["timestamp", "Reading taken", (r) => when(r.timestamp)],
  ["updatedAt", "Stored", (r) => when(r.updatedAt)],
];

function liveView() {
  const values = h("dl", {
    class: "live",
    "aria-live": "polite",
    "aria-atomic": "true",
    id: "live-reading",
  });
  let shown = null;
  return {
    element: values,
    // Newest wins, as in the live table: a refetch racing the stream never goes back in time.
    show(reading) {
      if (shown && Date.parse(reading.timestamp) < Date.parse(shown.timestamp)) {
        return;
      }
      shown = reading;
      values.replaceChildren(
        ...LIVE_FIELDS.map(([field, label, format]) =>
          h(
            "div",
            { class: "pair" },
            h("dt", {}, label),
            h("dd", { "data-field": field }, format(reading)),
          ),
        ),
      );
    },
    missing(message) {
      if (!shown) {
        values.replaceChildren(
          h("div", { class: "pair" }, h("dt", {}, "No reading yet"), h("dd", {}, message)),
        );
      }
    },
  };
}

// Efficiency per session, oldest to newest, as an inline SVG; points coloured by the
// status the API rated them with (the thresholds are the server's, not repeated here).
function sessionChart(sessions) {
  const rated = sessions.filter((s) => s.efficiencyRatio !== null).reverse();
  if (!rated.length) {
    return h("p", { class: "empty" }, "No rated charging session yet.");
  }
  const width = 640;
  const height = 220;
  const pad = { left: 48, right: 16, top: 12, bottom: 36 };
  const ratios = rated.map((s) => s.efficiencyRatio);
  // At most ten grid lines, whatever the data (a ratio of 40 is bad data, but it is shown).
  const span = Math.max(1.1, ...ratios) - Math.min(0.6, ...ratios);
  const step = [0.1, 0.2, 0.5, 1, 2, 5, 10, 100, 1000].find((s) => span / s <= 10) ?? 10000;
  const low = Math.floor(Math.min(0.6, ...ratios) / step + 1e-9) * step;
  const high = Math.ceil(Math.max(1.1, ...ratios) / step - 1e-9) * step;
  const x = (i) =>
    pad.left + (rated.length === 1 ? 0.5 : i / (rated.length - 1)) * (width - pad.left - pad.right);
  const y = (r) => pad.top + ((high - r) / (high - low)) * (height - pad.top - pad.bottom);

  const grid = [];
  for (let tick = Math.round(low / step); tick <= Math.round(high / step); tick += 1) {
    const value = tick * step;
    grid.push(
      svg("line", {
        class: "grid",
        x1: pad.left,
        x2: width - pad.right,
        y1: y(value),
        y2: y(value),
      }),
      svg(
        "text",
        { class: "tick", x: pad.left - 6, y: y(value) + 4, "text-anchor": "end" },
        value.toFixed(step < 1 ? 1 : 0),
      ),
    );
  }
  const line = svg("polyline", {
    class: "trend",
    points: rated.map((s, i) => `${x(i)},${y(s.efficiencyRatio)}`).join(" "),
  });
  const points = rated.map((s, i) =>
    svg(
      "circle",
      { class: `point status-${s.status}`, cx: x(i), cy: y(s.efficiencyRatio), r: 5 },
      svg(
        "title",
        {},
        `${new Date(s.startedAt).toLocaleString()}: ${s.efficiencyRatio.toFixed(4)} (${s.status.replace("_", " ")})`,
      ),
    ),
  );
  const first = new Date(rated[0].startedAt).toLocaleDateString();
  const last = new Date(rated[rated.length - 1].startedAt).toLocaleDateString();
  const labels = [
    svg("text", { class: "tick", x: x(0), y: height - 12, "text-anchor": "start" }, first),
    svg(
      "text",
      { class: "tick", x: x(rated.length - 1), y: height - 12, "text-anchor": "end" },
      last,
    ),
  ];
  return svg(
    "svg",
    {
      class: "chart",
      viewBox: `0 0 ${width} ${height}`,
      role: "img",
      "aria-labelledby": "chart-title",
    },
    svg(
      "title",
      { id: "chart-title" },
      `Efficiency of ${rated.length} charging sessions, oldest to newest, from ${first} to ${last}`,
    ),
    ...grid,
    line,
    ...points,
    ...labels,
  );
}

function sessionsTable(sessions) {
  const rows = sessions.map((s) =>
    h(
      "tr",
      {},
      h("td", {}, when(s.startedAt)),
      h("td", {}, when(s.endedAt)),
      h("td", {}, s.state),
      h("td", {}, statusBadge(s.status)),
      h("td", { class: "num" }, number(s.efficiencyRatio, 4)),
      h("td", { class: "num" }, number(s.kwhDeliveredDc, 3)),
      h("td", { class: "num" }, number(s.kwhConsumedAc, 3)),
      h("td", {}, s.meterId ?? "—"),
    ),
  );
  if (!rows.length) {
    rows.push(h("tr", {}, h("td", { colspan: "8", class: "empty" }, "No charging session yet.")));
  }
  return table(
    "Charging sessions, newest first",
    [
      ["Started"],
      ["Ended"],
      ["State"],
      ["Status"],
      ["Efficiency", true],
      ["DC, kWh", true],
      ["AC, kWh", true],
      ["Meter"],
    ],
    h("tbody", {}, rows),
  );
}

function assignmentsTable(assignments) {
  const rows = assignments.map((a) =>
    h(
      "tr",
      {},
      h("td", {}, a.meterId),
      h("td", {}, when(a.from)),
      h("td", {}, a.to ? when(a.to) : "now"),
    ),
  );
  if (!rows.length) {
    rows.push(
      h(
        "tr",
        {},
        h("td", { colspan: "3", class: "empty" }, "No meter assigned: efficiency cannot be rated."),
      ),
    );
  }
  return table("Meter assignments", [["Meter"], ["From"], ["To"]], h("tbody", {}, rows));
}

function section(id, title, ...content) {
  return h("section", { "aria-labelledby": id }, h("h2", { id }, title), ...content);
}

async function vehiclePage(id) {
  const title = `Vehicle ${id}`;
  const path = `/v1/vehicles/${encodeURIComponent(id)}`;
  const live = liveView();
  const streamState = h("p", { class: "stream-state" }, "Live updates: connecting…");
  const mine = visit;

  const loadLive = () =>
    api(`${path}/live`).then(
      (reading) => mine === visit && live.show(reading),
      (err) => {
        if (err instanceof ApiError && err.code === "vehicle_not_found") {
          live.missing(err.message); // it shows up from the stream once it reports
          return;
        }
        throw err;
      },
    );
  const [reading, sessions, meters] = await Promise.allSettled([
    loadLive(),
    api(`${path}/sessions`, { query: { limit: SESSIONS_SHOWN } }),
    api(`${path}/meter`),
  ]);
  if (mine !== visit) return;
  const failed = [reading, sessions, meters]
    .filter((r) => r.status === "rejected")
    .map((r) => r.reason);
  const denied = failed.find((err) => err instanceof ApiError && err.wantsToken);
  if (denied) {
    pageFailed(title, denied);
    return;
  }
  const part = (result, render) =>
    result.status === "fulfilled" ? render(result.value) : failure(result.reason, route);
  show(
    title,
    section(
      "live-title",
      "Live reading",
      streamState,
      reading.status === "rejected" ? failure(reading.reason, route) : live.element,
    ),
    section(
      "sessions-title",
      "Efficiency per charging session",
      part(sessions, (page) => [sessionChart(page.sessions), sessionsTable(page.sessions)]),
    ),
    section(
      "meters-title",
      "Meters",
      part(meters, (body) => assignmentsTable(body.assignments)),
    ),
  );

  const stream = `/v1/stream?vehicleId=${encodeURIComponent(id)}&kinds=live`;
  leave = follow(stream, {
    onEvent(event) {
      if (event.type === "live") {
        const body = JSON.parse(event.data);
        if (body.vehicleId === id) live.show(body);
      } else if (event.type === "reset") {
        loadLive().catch(() => {}); // missed too much: the live endpoint has the truth
      }
    },
    onState(state, err, waitMs) {
      if (state === "connected") {
        streamState.textContent = "Live updates: on";
        // Anything committed between the first load and this (re)connection is in the table.
        loadLive().catch(() => {});
      } else {
        streamState.textContent = `Live updates: ${err.message}; retrying in ${Math.ceil(waitMs / 1000)} s`;
      }
    },
    onDenied(err) {
      streamState.textContent = `Live updates: ${err.message}`;
    },
  });
}

// --- #/alerts ---------------------------------------------------------------------------------

function evidenceText(alert) {
  const e = alert.evidence || {};
  if (typeof e.averageEfficiency === "number") {
    return `average efficiency ${e.averageEfficiency.toFixed(3)} over ${(e.sessionIds || []).length} sessions`;
  }
  if (Array.isArray(e.readings)) {
    return `battery at ${e.readings.map((r) => `${r.batteryTemp} °C`).join(", ")}`;
  }
  if (e.lastReadingAt) {
    return `last ${e.device || "device"} reading ${new Date(e.lastReadingAt).toLocaleString()}`;
  }
  return JSON.stringify(e);
}

function isVehicle(alert) {
  return (
    alert.kind === "battery_overheat" || (alert.evidence && alert.evidence.device === "vehicle")
  );
}

async function alertsPage() {
  const title = "Open alerts";
  const notice = h("div", { class: "notice" });
  const said = h("p", { class: "said", role: "status" });
  const rows = pager({
    notice,
    empty: "No open alert.",
    row: (alert) => {
      const kind = ALERT_KINDS[alert.kind] || alert.kind;
      const button = h(
        "button",
        { type: "button", "aria-label": `Acknowledge ${kind} on ${alert.subject}` },
        "Acknowledge",
      );
      button.addEventListener("click", async () => {
        button.disabled = true;
        try {
          await api(`/v1/alerts/${encodeURIComponent(alert.alertId)}/ack`, { method: "POST" });
          said.textContent = `Acknowledged: ${kind} on ${alert.subject}.`;
          await rows.first(); // the list as it is now: the acknowledged one has left it
          // Its button is gone with its row: the keyboard goes on to the next alert.
          const next = rows.body.querySelector("button") || main.querySelector("h1");
          next.focus();
        } catch (err) {
          button.disabled = false;
          notice.replaceChildren(failure(err, () => button.click()));
        }
      });
      return h(
        "tr",
        { "data-alert": alert.alertId },
        h("td", {}, kind),
        h("th", { scope: "row" }, isVehicle(alert) ? vehicleLink(alert.subject) : alert.subject),
        h("td", {}, when(alert.openedAt)),
        h("td", {}, evidenceText(alert)),
        h("td", {}, button),
      );
    },
    load: async (cursor) => {
      const page = await api("/v1/alerts", { query: { state: "open", limit: PAGE_SIZE, cursor } });
      return { items: page.alerts, nextCursor: page.nextCursor };
    },
  });
  if (!(await firstPage(rows, title))) return;
  show(
    title,
    said,
    notice,
    table(
      "Open alerts, newest first",
      [["Kind"], ["Subject"], ["Opened"], ["Evidence"], ["Action"]],
      rows.body,
    ),
    rows.more,
  );
}

// --- routing -------------------------------------------------------------------------------------

function route() {
  leave();
  leave = () => {};
  visit += 1;
  const hash = window.location.hash.replace(/^#/, "") || "/";
  const mark = hash.indexOf("?");
  const path = mark < 0 ? hash : hash.slice(0, mark);
  const params = new URLSearchParams(mark < 0 ? "" : hash.slice(mark + 1));
  const parts = path.split("/").filter(Boolean);
  const current = parts[0] === "alerts" ? "alerts" : parts.length ? "" : "fleet";
  for (const link of document.querySelectorAll("[data-nav]")) {
    if (link.dataset.nav === current) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  if (!main.querySelector("h1")) {
    main.setAttribute("aria-busy", "true");
  }
  let page;
  if (!parts.length) {
    page = fleetPage(params);
  } else if (parts[0] === "vehicles" && parts.length === 2 && decodes(parts[1])) {
    page = vehiclePage(decodeURIComponent(parts[1]));
  } else if (parts[0] === "alerts" && parts.length === 1) {
    page = alertsPage();
  } else {
    show(
      "Not found",
      h("p", {}, "The console has no such page. ", h("a", { href: "#/" }, "Back to the fleet")),
    );
    return;
  }
  // Never a blank page: whatever escaped a page's own handling is shown too.
  page
    .catch((err) => pageFailed("Something went wrong", err))
    .finally(() => main.removeAttribute("aria-busy"));
}

function decodes(text) {
  try {
    decodeURIComponent(text);
    return true;
  } catch {
    return false; // a hand-typed "%" that is not an escape: no such page
  }
}

window.addEventListener("hashchange", () => {
  navigated = true;
  route();
});

forgetButton.addEventListener("click", () => {
  forgetToken();
  route();
});

route();
