// Rebill portal: the page GHL embeds. Vanilla JS, no build step.
// Sign-in: ask the GHL parent for the encrypted user context (REQUEST_USER_DATA), exchange it at
// POST /api/portal/session for a short-lived bearer token, keep the token in memory only (cookies are
// third-party inside the iframe and browsers drop them; docs/ghl.md §3.2, §3.5).
// Safety: every value from the API reaches the page through textContent or attributes, never innerHTML.
"use strict";

(function () {
  const API = "/api/portal";
  const HANDSHAKE_TIMEOUT_MS = 8000;
  const state = {
    token: null,
    session: null,
    refreshTimer: null,
    signingIn: null,
    products: null, // [{id, name, prices: [...]}] from /prices, or null when Stripe is not connected
    subaccounts: [],
    clients: [],
    stripe: null,
    editing: null, // the client being edited in the dialog, or null when adding
    summary: null, // GET /summary: this period's totals, failing clients, whether billing has stopped
    current: null, // [view, id] on screen, re-read after each tick
    pollTimer: null,
  };
  const REFRESH_SECONDS = Number(document.body.dataset.refreshSeconds) || 15;

  // ---- small DOM helpers ------------------------------------------------------------------------
  const $ = (selector, root = document) => root.querySelector(selector);
  const $$ = (selector, root = document) => Array.from(root.querySelectorAll(selector));

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (key === "text") node.textContent = String(value);
      else if (key === "className") node.className = value;
      else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
      else if (key === "dataset") Object.assign(node.dataset, value);
      else node.setAttribute(key, value === true ? "" : String(value));
    }
    for (const child of children.flat()) {
      if (child === null || child === undefined) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  function cell(label, content, className) {
    return el("td", { "data-label": label, className }, content);
  }

  const numberFormat = new Intl.NumberFormat();
  const fmt = (value) => (value === null || value === undefined ? "—" : numberFormat.format(value));
  function when(iso) {
    if (!iso) return "—";
    const date = new Date(iso);
    return isNaN(date) ? String(iso) : date.toLocaleString();
  }
  function money(amount, currency) {
    if (amount === null || amount === undefined) return "";
    try {
      return new Intl.NumberFormat(undefined, { style: "currency", currency: (currency || "usd").toUpperCase() })
        .format(amount / 100);
    } catch (error) {
      return `${amount / 100} ${currency || ""}`;
    }
  }

  // A decimal string in major units ("12.30") with its currency, shown in the user's locale.
  function amount(estimate) {
    if (!estimate) return "—";
    try {
      return new Intl.NumberFormat(undefined, { style: "currency", currency: estimate.currency.toUpperCase() })
        .format(estimate.amount);
    } catch (error) {
      return `${estimate.amount} ${estimate.currency.toUpperCase()}`;
    }
  }

  function day(iso) {
    const date = new Date(iso);
    return isNaN(date) ? String(iso) : date.toLocaleDateString(undefined, { timeZone: "UTC", day: "numeric", month: "short" });
  }

  function notify(message, kind = "error") {
    const box = $("#notice");
    box.textContent = message;
    box.className = `notice ${kind}`;
    box.hidden = !message;
  }

  // ---- sign-in --------------------------------------------------------------------------------------
  // The CSP frame-ancestors sources of this page, rendered by the server: 'self', https://host[:port] or
  // https://*.domain[:port] (a wildcard covers subdomains only, as in CSP).
  function originMayFrameUs(origin) {
    let url;
    try {
      url = new URL(origin);
    } catch (error) {
      return false;
    }
    return (document.body.dataset.frameAncestors || "").split(" ").some((source) => {
      if (source === "'self'") return origin === window.location.origin;
      const match = /^(https?):\/\/(\*\.)?([^:/]+)(?::(\d+|\*))?$/.exec(source);
      if (!match || url.protocol !== `${match[1]}:`) return false;
      const [, , wildcard, host, port] = match;
      const hostMatches = wildcard ? url.hostname.endsWith(`.${host.toLowerCase()}`) : url.hostname === host.toLowerCase();
      return hostMatches && (port === "*" || url.port === (port || ""));
    });
  }

  function askParentForUserData() {
    return new Promise((resolve, reject) => {
      if (window.parent === window) {
        reject(new Error("Open Rebill from inside GoHighLevel (Billing → Rebilling)."));
        return;
      }
      const timer = setTimeout(() => {
        window.removeEventListener("message", onMessage);
        reject(new Error("GoHighLevel did not answer. Open Rebill from inside GoHighLevel (Billing → Rebilling)."));
      }, HANDSHAKE_TIMEOUT_MS);
      // Only our parent window, and only from an origin allowed to frame us, may hand us a payload:
      // another window or frame (a page that opened GHL, a sibling iframe) could otherwise answer first
      // with its own agency's payload and sign the user into it (login CSRF).
      function onMessage(event) {
        const data = event.data;
        if (event.source !== window.parent || !originMayFrameUs(event.origin)) return;
        if (data && data.message === "REQUEST_USER_DATA_RESPONSE" && typeof data.payload === "string") {
          clearTimeout(timer);
          window.removeEventListener("message", onMessage);
          resolve(data.payload);
        }
      }
      window.addEventListener("message", onMessage);
      window.parent.postMessage({ message: "REQUEST_USER_DATA" }, "*");
    });
  }

  async function postJson(path, body) {
    const response = await fetch(API + path, {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body),
      credentials: "omit",
    });
    const data = await response.json().catch(() => ({}));
    if (!response.ok) throw new ApiError(response.status, data);
    return data;
  }

  // Demo mode (development only): `make run` seeds the demo agency a moment after the web process starts.
  async function demoSession(attempt = 1) {
    try {
      return await postJson("/demo-session", {});
    } catch (error) {
      if (error.status !== 503 || attempt >= 15) throw error;
      $("#signing-in-text").textContent = "Waiting for the demo agency to be seeded…";
      await new Promise((resolve) => setTimeout(resolve, 2000));
      return demoSession(attempt + 1);
    }
  }

  function signIn() {
    // One handshake at a time: parallel 401s share it.
    if (!state.signingIn) {
      state.signingIn = (async () => {
        const answer = document.body.dataset.demo === "on"
          ? await demoSession()
          : await postJson("/session", { payload: await askParentForUserData() });
        state.token = answer.token;
        state.session = answer.session;
        clearTimeout(state.refreshTimer);
        // Renew a minute before expiry so an open page keeps working.
        const renewIn = Math.max(30, (answer.expires_in || 3600) - 60) * 1000;
        state.refreshTimer = setTimeout(() => { state.token = null; signIn().catch(() => {}); }, renewIn);
      })().finally(() => { state.signingIn = null; });
    }
    return state.signingIn;
  }

  class ApiError extends Error {
    constructor(status, body) {
      super((body && body.error) || `request failed (${status})`);
      this.status = status;
      this.fields = (body && body.fields) || {};
      this.confirm = body && body.confirm; // a 409 names the field that confirms the change it describes
    }
  }

  async function api(method, path, body, retried = false) {
    if (!state.token) await signIn();
    const headers = { Authorization: `Bearer ${state.token}` };
    if (body !== undefined) headers["Content-Type"] = "application/json";
    const response = await fetch(API + path, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      credentials: "omit",
    });
    if (response.status === 401 && !retried) {
      state.token = null;
      return api(method, path, body, true);
    }
    const data = response.status === 204 ? null : await response.json().catch(() => null);
    if (!response.ok) throw new ApiError(response.status, data);
    return data;
  }

  // ---- routing --------------------------------------------------------------------------------------
  const views = {
    statement: showStatement,
    clients: showClients,
    client: showClient,
    unmapped: showUnmapped,
    stripe: showStripe,
    "api-keys": showApiKeys,
    alerts: showAlerts,
  };

  // The agency's own settings; subaccount users (the agency's customers) neither see nor load them.
  const AGENCY_VIEWS = new Set(["stripe", "api-keys"]);

  async function route() {
    // A subaccount user is the agency's customer: their statement comes first.
    const home = state.session.sees_agency_settings ? "clients" : "statement";
    const [name, id] = (location.hash.replace(/^#/, "") || home).split("/");
    const allowed = views[name] && (state.session.sees_agency_settings || !AGENCY_VIEWS.has(name));
    const view = allowed ? name : home;
    for (const section of $$(".view")) section.hidden = section.dataset.view !== view;
    for (const tab of $$(".tabs a")) {
      const current = tab.dataset.tab === view || (view === "client" && tab.dataset.tab === "clients");
      if (current) tab.setAttribute("aria-current", "page");
      else tab.removeAttribute("aria-current");
    }
    notify("");
    state.current = [view, id];
    await refresh(true);
  }

  // Re-read the screen's numbers (and the banner every screen shows); quietly when it is a background poll.
  async function refresh(firstLoad = false) {
    const [view, id] = state.current || [];
    if (!view) return;
    const stamp = $("#updated");
    if (firstLoad) stamp.textContent = "Loading…";
    try {
      await Promise.all([views[view](id), refreshBanner()]);
      stamp.textContent = `Updated ${new Date().toLocaleTimeString([], { hour12: false })}`;
    } catch (error) {
      if (firstLoad) notify(error.message);
      stamp.textContent = `Could not update: ${error.message}`;
    }
  }

  function startPolling() {
    clearInterval(state.pollTimer);
    state.pollTimer = setInterval(() => {
      // Not while a dialog is open (it would re-render what the user is editing) or the page is hidden.
      if (document.hidden || $$("dialog[open]").length) return;
      refresh();
    }, REFRESH_SECONDS * 1000);
  }

  // ---- billing problems in plain sight --------------------------------------------------------------
  async function refreshBanner() {
    state.summary = await api("GET", "/summary");
    const summary = state.summary;
    const banner = $("#billing-banner");
    if (summary.stripe_disconnected) {
      banner.className = "banner stopped";
      banner.replaceChildren(el("strong", { text: "Billing has stopped. " }), state.session.sees_agency_settings
        ? summary.billing_problem
        : "Your agency's Stripe connection needs attention; usage is still recorded.");
    } else if (summary.clients_failing) {
      const count = summary.clients_failing;
      banner.className = "banner";
      banner.replaceChildren(
        el("strong", { text: `${count} client${count === 1 ? "" : "s"} not billing correctly:` }),
        el("ul", {}, summary.problems.map((row) => el("li", {},
          el("a", { href: `#client/${row.client_id}`, text: row.nickname }), ` — ${row.problem}`))),
      );
    }
    banner.hidden = !(summary.stripe_disconnected || summary.clients_failing);
    renderMoneySummary();
  }

  // ---- shared data ----------------------------------------------------------------------------------
  // Once per page: the Stripe connection and its prices, for agency users (they label clients' prices).
  function loadAgencySettings() {
    if (state.stripe || !state.session.sees_agency_settings) return Promise.resolve();
    return loadStripe().then(loadProducts);
  }

  async function loadStripe() {
    state.stripe = await api("GET", "/stripe-key");
    return state.stripe;
  }

  async function loadProducts() {
    if (!state.stripe || !state.stripe.connected) {
      state.products = null;
      return null;
    }
    try {
      state.products = (await api("GET", "/prices")).products;
    } catch (error) {
      state.products = null;
      notify(`Stripe prices could not be loaded: ${error.message}`);
    }
    return state.products;
  }

  function findPrice(priceId) {
    for (const product of state.products || []) {
      for (const price of product.prices || []) {
        if (price.id === priceId) return { product, price };
      }
    }
    return null;
  }

  function priceLabel(price) {
    const amount = money(price.unit_amount, price.currency);
    const per = price.interval ? ` per unit / ${price.interval}` : "";
    const name = price.nickname ? `${price.nickname} · ` : "";
    return `${name}${amount}${per}`.trim() || price.id;
  }

  function sourceLabel(client) {
    if (client.provider === "ghl") return client.subaccount_name || client.location_id;
    return client.channel_id;
  }

  const PROVIDERS = { capri_api: "Capri API", ghl: "GoHighLevel" };
  const CHARGE_BY = { tokens: "Tokens", messages: "Messages" };
  const MESSAGE_SOURCES = {
    ghl_outbound: "GHL outbound messages",
    ghl_inbound: "GHL inbound messages",
    ghl_all: "All GHL messages (inbound and outbound)",
    platform: "Messages the AI platform reports",
  };
  const BILLING_STATES = { ok: "OK", failing: "Failing", paused: "Paused", stripe_disconnected: "Stopped" };

  // Names, not ids: what Stripe calls the product and price (cached with the client's period), else /prices.
  function productPriceNames(client) {
    const found = findPrice(client.stripe_price_id);
    const product = client.product_name || (found && found.product.name) || "Unnamed product";
    const price = client.price_name || (found && priceLabel(found.price)) || "unnamed price";
    return { product, price };
  }

  // Subaccount users get names and a plain billing_note, never the agency's Stripe ids or Stripe's words.
  function customerLabel(client) {
    if (!client.stripe_customer_id) return client.customer_name || "—";
    return client.customer_name ? `${client.customer_name} (${client.stripe_customer_id})` : client.stripe_customer_id;
  }

  function billingProblem(client) {
    return client.billing_problem || client.billing_note || "";
  }

  function measure(client) {
    return client.message_source ? MESSAGE_SOURCES[client.message_source] || client.message_source
      : CHARGE_BY[client.charge_by] || client.charge_by;
  }

  // ---- clients --------------------------------------------------------------------------------------
  async function showClients() {
    const [clients] = await Promise.all([api("GET", "/clients"), loadAgencySettings()]);
    state.clients = clients.clients;
    $("#stripe-missing").hidden = !state.session.sees_agency_settings || Boolean(state.stripe && state.stripe.connected);
    const body = $("#clients-table tbody");
    body.replaceChildren(...state.clients.map(clientRow));
    $("#clients-empty").hidden = state.clients.length > 0;
    $("#clients-table").hidden = state.clients.length === 0;
  }

  function renderMoneySummary() {
    const summary = state.summary;
    const tiles = [];
    for (const total of (summary && summary.totals) || []) {
      tiles.push(stat("Estimated this period", amount(total), `${fmt(total.units)} units, ${total.currency.toUpperCase()}`));
    }
    if (summary) {
      tiles.push(stat("Clients", fmt(summary.clients),
        summary.clients_failing ? `${fmt(summary.clients_failing)} not billing correctly` : "all billing normally"));
    }
    $("#money-summary").replaceChildren(...tiles);
  }

  // "7", or "7 / 10" under a monthly cap, "10 / 10 capped" once it is reached.
  function unitsOfCap(units, cap) {
    if (!cap) return fmt(units);
    return `${fmt(units)} / ${fmt(cap)}${units >= cap ? " capped" : ""}`;
  }

  function clientRow(client) {
    const names = productPriceNames(client);
    const period = client.period || {};
    const state_ = client.billing_state || "ok";
    const badge = el("span", {
      className: `badge ${client.status === "shadow" ? "shadow" : state_}`,
      title: billingProblem(client) || "",
      text: client.status === "shadow" ? "Dry run" : BILLING_STATES[state_] || state_,
    });
    return el("tr", { dataset: { clientId: client.id }, className: state_ === "failing" ? "failing" : null },
      cell("Nickname", el("a", { href: `#client/${client.id}`, text: client.nickname, title: client.nickname }), "nickname"),
      cell(client.provider === "ghl" ? "Subaccount" : "API channel", sourceLabel(client)),
      cell("Product / price", `${names.product} · ${names.price}`),
      cell("Charge by", measure(client)),
      cell("Billing unit", fmt(client.billing_unit), "num"),
      cell("Counted (lifetime)", fmt(client.counted_usage), "num"),
      cell("Units (lifetime)", fmt(client.units_logged), "num"),
      cell("Units this period", unitsOfCap(period.units, client.monthly_cap_units), "num"),
      cell("Estimated charge", estimateText(client), "num"),
      cell("Billing", el("div", { className: "state-cell" }, badge,
        state_ === "ok" ? null : el("div", { className: "hint", text: billingProblem(client) }))),
    );
  }

  // This period's estimated charge; a dry run's "would be" amount beside it (billing.dry_run).
  function estimateText(client) {
    const period = client.period || {};
    const dryRun = client.would_have_billed;
    if (!dryRun) return amount(period.estimate);
    const wouldBe = `would be ${amount(dryRun.estimate)}`;
    return client.status === "shadow" && !period.units ? wouldBe : `${amount(period.estimate)} (dry run ${wouldBe})`;
  }

  // ---- a client's statement (what a subaccount user reads first) ------------------------------------
  async function showStatement() {
    const statements = (await api("GET", "/statement")).statements;
    $("#statements").replaceChildren(...statements.map(statementCard));
    $("#statements-empty").hidden = statements.length > 0;
  }

  function statementCard(statement) {
    const period = statement.period;
    const dryRun = statement.would_have_billed;
    const charge = statement.dry_run && dryRun ? `would be ${amount(dryRun.estimate)}` : amount(period.estimate);
    const previous = statement.previous_periods;
    return el("article", { className: "statement", dataset: { clientId: statement.client_id } },
      el("div", { className: "toolbar" },
        el("h3", { text: statement.nickname }),
        el("span", { className: "hint", text: statement.state }),
        el("span", { className: "spacer" }),
        el("button", { type: "button", text: "Download CSV", onclick: () => downloadCsv(statement.client_id) })),
      el("p", { className: "hint", text: `Billing period ${day(period.start)} – ${day(period.end)}`
        + (statement.product_name ? ` · ${statement.product_name}` : "") }),
      el("div", { className: "stats" },
        stat("Usage this period", fmt(statement.dry_run && dryRun ? dryRun.usage : period.usage), statement.measure),
        stat("Units", fmt(statement.dry_run && dryRun ? dryRun.units : period.units),
          `1 unit per ${fmt(statement.billing_unit)} ${statement.measure}`),
        stat("Estimated charge", charge, statement.dry_run ? "dry run: nothing is billed yet" : "so far this period")),
      el("h4", { text: `Daily usage (${statement.measure}, UTC days)` }),
      el("div", { className: "chart" }, usageChart(statement.daily, statement.measure)),
      previous.length ? el("h4", { text: "Previous periods" }) : null,
      previous.length ? el("div", { className: "table-wrap" }, el("table", { className: "previous-periods" },
        el("thead", {}, el("tr", {}, el("th", { text: "Period" }), el("th", { className: "num", text: "Units" }),
          el("th", { className: "num", text: "Estimated charge" }))),
        el("tbody", {}, previous.map((row) => el("tr", {},
          cell("Period", `${day(row.start)} – ${day(row.end)}`),
          cell("Units", fmt(row.units), "num"),
          cell("Estimated charge", amount(row.estimate), "num")))))) : null,
    );
  }

  // The export needs the bearer token, so it is fetched and handed to the browser as a file.
  async function downloadCsv(clientId) {
    if (!state.token) await signIn();
    const response = await fetch(`${API}/clients/${encodeURIComponent(clientId)}/export.csv`, {
      headers: { Authorization: `Bearer ${state.token}` },
      credentials: "omit",
    });
    if (!response.ok) {
      notify((await response.json().catch(() => ({}))).error || `export failed (${response.status})`);
      return;
    }
    const disposition = response.headers.get("Content-Disposition") || "";
    const name = (disposition.match(/filename="([^"]+)"/) || [])[1] || "rebill-export.csv";
    const link = el("a", { href: URL.createObjectURL(await response.blob()), download: name });
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(link.href), 10000);
  }

  // ---- one client -----------------------------------------------------------------------------------
  async function showClient(id) {
    const [client, usage] = await Promise.all([
      api("GET", `/clients/${encodeURIComponent(id)}`),
      api("GET", `/clients/${encodeURIComponent(id)}/usage`),
      loadAgencySettings(),
    ]);
    $("#client-title").textContent = client.nickname;
    const status = $("#client-status");
    const billing = client.billing_state || "ok";
    status.textContent = client.status === "shadow" ? "Dry run" : BILLING_STATES[billing] || billing;
    status.className = `badge ${client.status === "shadow" ? "shadow" : billing}`;
    const problem = $("#client-problem");
    problem.hidden = billing === "ok";
    problem.textContent = billing === "ok" ? "" : `What to fix: ${billingProblem(client)}`;
    const pause = $("#client-pause");
    // A dry run ends with "Start billing": usage from that moment on is billed, none of the dry run's.
    pause.textContent = { paused: "Resume", shadow: "Start billing" }[client.status] || "Pause";
    pause.onclick = () => setClientStatus(client, client.status === "active" ? "paused" : "active");
    $("#client-edit").onclick = () => openClientDialog({ client });
    $("#client-export").onclick = () => downloadCsv(client.id);
    $("#client-delete").onclick = () => deleteClient(client);

    const names = productPriceNames(client);
    const period = client.period || {};
    const facts = [
      ["Provider", PROVIDERS[client.provider] || client.provider],
      [client.provider === "ghl" ? "Subaccount" : "API channel", sourceLabel(client)],
      ["Product", names.product],
      ["Price", names.price],
      ["Stripe customer", customerLabel(client)],
      ["Charge by", measure(client)],
      ["Billing unit", `1 unit every ${fmt(client.billing_unit)} ${client.charge_by}`],
      ["This billing period", period.start ? `${day(period.start)} – ${day(period.end)} (UTC)` : "—"],
    ];
    if (client.payment_problem) facts.push(["Payment failed", client.payment_problem]);
    if (client.subscription_problem) facts.push(["Subscription", client.subscription_problem]);
    if (client.monthly_cap_units) {
      const capMoney = client.monthly_cap_amount
        ? ` (set as ${client.monthly_cap_amount} ${client.monthly_cap_currency.toUpperCase()})`
        : client.cap_estimate ? ` (≈ ${amount(client.cap_estimate)} at this price)` : "";
      facts.push(["Monthly cap", `${fmt(client.monthly_cap_units)} units${capMoney}; alerts at ${client.alert_thresholds.join(", ")} %`]);
    }
    facts.push(["When a payment fails", client.pause_on_payment_failure ? "Pause billing until paid" : "Keep billing"]);
    $("#client-facts").replaceChildren(...facts.flatMap(([term, value]) => [el("dt", { text: term }), el("dd", { text: value })]));

    const unit = client.billing_unit;
    const dryRun = client.would_have_billed;
    const stats = [
      stat("Units this period", fmt(period.units), "sent or waiting for Stripe"),
      stat("Estimated charge", amount(period.estimate), period.estimate ? "so far this period" : "price not read from Stripe yet"),
      stat("Usage counted", fmt(usage.counted_usage), `${client.charge_by}, lifetime`),
      stat("Units logged", fmt(usage.units_logged), "in Rebill's ledger"),
      stat("Units reported", fmt(usage.units_reported), "accepted by Stripe"),
      stat("Remainder", `${fmt(usage.remainder)} / ${fmt(unit)}`, "toward the next unit"),
    ];
    if (usage.units_awaiting_stripe) stats.push(stat("Awaiting Stripe", fmt(usage.units_awaiting_stripe), "units, retried each tick"));
    if (usage.paused_usage) stats.push(stat("Paused usage", fmt(usage.paused_usage), "received while paused, never billed"));
    if (usage.capped_usage) stats.push(stat("Capped usage", fmt(usage.capped_usage), "after the monthly cap, never billed"));
    if (dryRun) {
      stats.unshift(stat("Would have billed", `would be ${amount(dryRun.estimate)}`,
        `dry run: ${fmt(dryRun.units)} units from ${fmt(dryRun.usage)} ${client.charge_by} this period, nothing sent to Stripe`));
    }
    $("#client-stats").replaceChildren(...stats);
    $("#chart-title").textContent = `Daily usage (${client.charge_by}, UTC days)`;
    $("#usage-chart").replaceChildren(usageChart(usage.daily || [], client.charge_by));
    const models = usage.models || [];
    $("#models-table tbody").replaceChildren(...models.map((row) => el("tr", {},
      cell("Model", row.model || "(not given)"),
      cell("Input tokens", fmt(row.input_tokens), "num"),
      cell("Output tokens", fmt(row.output_tokens), "num"),
      cell("Messages", fmt(row.messages), "num"),
      cell("Events", fmt(row.events), "num"),
    )));
    $("#models-block").hidden = models.length === 0;

    const reports = usage.reports || [];
    $("#reports-table tbody").replaceChildren(...reports.map((report) => el("tr", {},
      cell("Identifier", report.identifier ? el("code", { text: report.identifier }) : "—"),
      cell("Units", fmt(report.units), "num"),
      cell("Status", el("span", { className: `badge ${report.status}`, text: report.status })),
      cell("Created", when(report.created_at)),
      cell("Sent", when(report.sent_at)),
      cell("Attempts", fmt(report.attempts), "num"),
      cell("Last error", [report.timestamp_shift, report.last_error || report.note].filter(Boolean).join(" · ")),
    )));
    $("#reports-empty").hidden = reports.length > 0;
    $("#reports-table").hidden = reports.length === 0;
  }

  function stat(label, value, note) {
    return el("div", { className: "stat" },
      el("div", { className: "stat-value", text: value }),
      el("div", { className: "stat-label", text: label }),
      el("div", { className: "stat-note", text: note }));
  }

  // A bar per day, as inline SVG (no chart library): billed usage, with usage received while paused or during a
  // dry run on top.
  function usageChart(days, measure) {
    const SVG = "http://www.w3.org/2000/svg";
    const svgEl = (tag, attrs, text) => {
      const node = document.createElementNS(SVG, tag);
      for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, String(value));
      if (text !== undefined) node.textContent = text;
      return node;
    };
    const billed = days.map((day) => Number(day.usage || 0));
    const paused = days.map((day) => Number(day.paused_usage || 0));
    const shadow = days.map((day) => Number(day.shadow_usage || 0));
    if (!billed.some(Boolean) && !paused.some(Boolean) && !shadow.some(Boolean)) {
      return el("p", { className: "empty", text: "No usage in the last 30 days yet." });
    }
    const width = 600;
    const height = 180;
    const pad = { left: 48, right: 8, top: 10, bottom: 28 };
    const max = Math.max(1, ...billed.map((value, index) => value + paused[index] + shadow[index]));
    const slot = (width - pad.left - pad.right) / days.length;
    const barWidth = Math.max(1, Math.min(40, slot * 0.7));
    const scaleY = (value) => ((height - pad.top - pad.bottom) * value) / max;
    const svg = svgEl("svg", { viewBox: `0 0 ${width} ${height}`, role: "img", class: "chart-svg",
      "aria-label": `Daily ${measure}, highest ${numberFormat.format(max)}` });
    svg.append(svgEl("line", { x1: pad.left, x2: width - pad.right, y1: height - pad.bottom,
      y2: height - pad.bottom, class: "axis" }));
    svg.append(svgEl("text", { x: pad.left - 6, y: pad.top + 4, "text-anchor": "end", class: "tick" },
      numberFormat.format(max)));
    svg.append(svgEl("text", { x: pad.left - 6, y: height - pad.bottom, "text-anchor": "end", class: "tick" }, "0"));
    days.forEach((day, index) => {
      const x = pad.left + index * slot + (slot - barWidth) / 2;
      let top = height - pad.bottom;
      for (const [value, className, note] of [[billed[index], "bar", "billed"], [paused[index], "bar-paused", "while paused"],
        [shadow[index], "bar-shadow", "in the dry run, not billed"]]) {
        if (value <= 0) continue;
        const barHeight = Math.max(1, scaleY(value));
        top -= barHeight;
        const bar = svgEl("rect", { x, y: top, width: barWidth, height: barHeight, class: className });
        bar.append(svgEl("title", {}, `${day.date}: ${numberFormat.format(value)} ${measure} ${note}`));
        svg.append(bar);
      }
    });
    const label = (index, anchor) => svg.append(svgEl("text", {
      x: pad.left + index * slot + slot / 2, y: height - 8, "text-anchor": anchor, class: "tick" }, days[index].date));
    label(0, days.length === 1 ? "middle" : "start");
    if (days.length > 1) label(days.length - 1, "end");
    return svg;
  }

  async function setClientStatus(client, status) {
    try {
      await api("PATCH", `/clients/${client.id}`, { status });
      await route();
    } catch (error) {
      notify(error.message);
    }
  }

  async function deleteClient(client) {
    const dialog = $("#confirm-dialog");
    $("#confirm-text").textContent =
      `Delete “${client.nickname}”? Its history is kept, but no more units are logged for it.`;
    dialog.returnValue = "";
    dialog.showModal();
    dialog.addEventListener("close", async () => {
      if (dialog.returnValue !== "yes") return;
      try {
        await api("DELETE", `/clients/${client.id}`);
        location.hash = "#clients";
      } catch (error) {
        notify(error.message);
      }
    }, { once: true });
  }

  // ---- "Add User" / edit dialog ----------------------------------------------------------------------
  async function openClientDialog({ client = null, prefill = null } = {}) {
    if (!state.stripe) await loadStripe();
    const [, subaccounts, clients] = await Promise.all([
      loadProducts(),
      api("GET", "/subaccounts"),
      api("GET", "/clients"), // for the "already used" warnings
    ]);
    state.subaccounts = subaccounts.subaccounts;
    state.clients = clients.clients;
    state.editing = client;
    const form = $("#client-form");
    form.reset();
    clearErrors(form);
    $("#client-dialog-title").textContent = client ? `Edit ${client.nickname}` : "Add User";
    if (!state.products) {
      showErrors(form, { _form: "Connect your Stripe account first (Stripe tab): products and prices come from it." });
    }

    fillSubaccounts(client ? client.location_id : prefill && prefill.location_id);
    const values = client || prefill || {};
    form.elements.nickname.value = values.nickname || "";
    setRadio(form, "provider", values.provider || "capri_api");
    form.elements.channel_id.value = values.channel_id || "";
    setRadio(form, "charge_by", values.charge_by || "tokens");
    // The measure is fixed once a client exists (a token remainder is no message remainder).
    for (const input of form.querySelectorAll('input[name="charge_by"]')) input.disabled = Boolean(client);
    form.elements.billing_unit.value = values.billing_unit || 1000;
    form.elements.stripe_customer_id.value = values.stripe_customer_id || "";
    closePicker();
    const chosen = $("#customer-chosen");
    chosen.hidden = !(client && client.customer_name);
    chosen.textContent = client && client.customer_name ? client.customer_name : "";
    if (values.message_source) form.elements.message_source.value = values.message_source;
    form.elements.pause_on_payment_failure.checked = Boolean(values.pause_on_payment_failure);
    // A cap set in money shows as that amount; its derived units are not a second cap.
    form.elements.monthly_cap_amount.value = values.monthly_cap_amount || "";
    form.elements.monthly_cap_units.value = values.monthly_cap_amount ? "" : values.monthly_cap_units || "";
    form.elements.alert_thresholds.value = client ? (values.alert_thresholds || []).join(", ") : "";
    fillProducts(values.stripe_product_id, values.stripe_price_id);
    $("#bill-unmapped-row").hidden = !prefill;
    $("#f-bill-unmapped").checked = false;
    $("#dry-run-row").hidden = Boolean(client);
    $("#f-dry-run").checked = false;
    syncDialog();
    $("#client-dialog").showModal();
    form.elements.nickname.focus();
  }

  function setRadio(form, name, value) {
    for (const input of form.querySelectorAll(`input[name="${name}"]`)) input.checked = input.value === value;
  }

  function fillSubaccounts(selected) {
    const select = $("#f-location");
    const options = state.subaccounts.map((sub) =>
      el("option", { value: sub.location_id, text: sub.name ? `${sub.name} (${sub.location_id})` : sub.location_id }));
    if (selected && !state.subaccounts.some((sub) => sub.location_id === selected)) {
      options.unshift(el("option", { value: selected, text: selected }));
    }
    if (!options.length) options.push(el("option", { value: "", text: "No subaccounts have Rebill installed" }));
    select.replaceChildren(...options);
    if (selected) select.value = selected;
  }

  function fillProducts(productId, priceId) {
    const products = state.products || [];
    const select = $("#f-product");
    select.replaceChildren(
      el("option", { value: "", text: products.length ? "Choose a product" : "No products in Stripe" }),
      ...products.map((product) => el("option", { value: product.product_id, text: product.name || product.product_id })),
    );
    const owner = priceId && findPrice(priceId);
    select.value = productId || (owner ? owner.product.product_id : "");
    fillPrices(priceId);
  }

  function fillPrices(selectedPriceId) {
    const product = (state.products || []).find((item) => item.product_id === $("#f-product").value);
    const prices = product ? product.prices || [] : [];
    const select = $("#f-price");
    select.replaceChildren(
      el("option", { value: "", text: product ? "Choose a price" : "Choose a product first" }),
      ...prices.map((price) => el("option", {
        value: price.id,
        disabled: !price.usable,
        text: price.usable ? priceLabel(price) : `${priceLabel(price)} — can't be used: ${price.reason}`,
      })),
    );
    const usable = prices.filter((price) => price.usable);
    if (selectedPriceId && prices.some((price) => price.id === selectedPriceId)) select.value = selectedPriceId;
    else if (usable.length === 1) select.value = usable[0].id;
    const unusable = prices.filter((price) => !price.usable);
    const hint = $("#price-hint");
    hint.hidden = unusable.length === 0;
    hint.textContent = unusable.length
      ? "Greyed-out prices cannot carry units; use a metered price per unit per month backed by a meter."
      : "";
  }

  function syncDialog() {
    const form = $("#client-form");
    const provider = form.elements.provider.value;
    const chargeBy = form.elements.charge_by.value;
    for (const block of $$("[data-when-provider]", form)) block.hidden = block.dataset.whenProvider !== provider;
    $("[data-when-messages-ghl]", form).hidden = !(provider === "ghl" && chargeBy === "messages");
    // The same words as the API's refusal: "must be a whole number from 1 to …".
    const unitInput = form.elements.billing_unit;
    const unitText = unitInput.value.trim();
    const unit = Number(unitText);
    const valid = /^\d+$/.test(unitText) && unit >= 1 && unit <= Number(unitInput.max);
    $("#unit-hint").textContent = valid
      ? `One unit is logged in Stripe every ${numberFormat.format(unit)} ${chargeBy}.`
      : `The billing unit must be ${unitInput.dataset.rule}.`;
    $("#unit-hint").classList.toggle("warning", !valid);
    syncWarnings();
  }

  // ---- customer picker: the agency's Stripe customers, searched as you type -------------------------
  let pickerTimer = null;
  let pickerSearch = 0;

  function wirePicker() {
    const input = $("#f-customer");
    input.addEventListener("input", () => {
      clearTimeout(pickerTimer);
      $("#customer-chosen").hidden = true;
      pickerTimer = setTimeout(searchCustomers, 250);
    });
    input.addEventListener("focus", () => { if (!input.value.trim()) searchCustomers(); });
    input.addEventListener("keydown", onPickerKey);
    input.addEventListener("blur", () => setTimeout(closePicker, 150));
  }

  async function searchCustomers() {
    const search = ++pickerSearch;
    const list = $("#customer-results");
    list.replaceChildren(el("li", { className: "muted", text: "Searching Stripe…" }));
    openPicker();
    try {
      const query = $("#f-customer").value.trim();
      const found = (await api("GET", `/customers?q=${encodeURIComponent(query)}`)).customers;
      if (search !== pickerSearch) return; // a newer keystroke's search answers instead
      list.replaceChildren(...(found.length ? found.map(customerOption)
        : [el("li", { className: "muted", text: "No customer in Stripe matches; check the spelling or the id." })]));
    } catch (error) {
      if (search === pickerSearch) list.replaceChildren(el("li", { className: "muted", text: error.message }));
    }
  }

  function customerOption(customer) {
    return el("li", {
      role: "option",
      "aria-selected": "false",
      dataset: { customerId: customer.id },
      onmousedown: (event) => { event.preventDefault(); chooseCustomer(customer); },
    },
    el("div", { text: customer.name || customer.email || customer.id }),
    el("div", { className: "muted", text: [customer.email, customer.id].filter(Boolean).join(" · ") }));
  }

  function chooseCustomer(customer) {
    $("#f-customer").value = customer.id;
    closePicker();
    const chosen = $("#customer-chosen");
    chosen.textContent = [customer.name || "(no name in Stripe)", customer.email].filter(Boolean).join(" · ");
    chosen.hidden = false;
    syncWarnings();
  }

  function onPickerKey(event) {
    const options = $$('#customer-results li[role="option"]');
    if (!options.length || $("#customer-results").hidden) return;
    const current = options.findIndex((option) => option.getAttribute("aria-selected") === "true");
    if (event.key === "ArrowDown" || event.key === "ArrowUp") {
      event.preventDefault();
      const next = (current + (event.key === "ArrowDown" ? 1 : options.length - 1)) % options.length;
      options.forEach((option, index) => option.setAttribute("aria-selected", String(index === next)));
      options[next].scrollIntoView({ block: "nearest" });
    } else if (event.key === "Enter" && current >= 0) {
      event.preventDefault();
      options[current].dispatchEvent(new MouseEvent("mousedown"));
    } else if (event.key === "Escape") {
      event.preventDefault(); // keep the dialog open: Escape closes only the list
      closePicker();
    }
  }

  function openPicker() {
    $("#customer-results").hidden = false;
    $("#f-customer").setAttribute("aria-expanded", "true");
  }

  function closePicker() {
    $("#customer-results").hidden = true;
    $("#f-customer").setAttribute("aria-expanded", "false");
  }

  // Warnings, not errors: two clients may share a nickname or a Stripe customer, but rarely should.
  function syncWarnings() {
    const form = $("#client-form");
    const others = state.clients.filter((client) => !state.editing || client.id !== state.editing.id);
    const nickname = form.elements.nickname.value.trim().toLowerCase();
    const sameName = nickname && others.find((client) => client.nickname.toLowerCase() === nickname);
    const nameWarning = $("#nickname-warning");
    nameWarning.hidden = !sameName;
    nameWarning.textContent = sameName ? `Another client is already called “${sameName.nickname}”.` : "";
    const customer = form.elements.stripe_customer_id.value.trim();
    const backing = customer ? others.filter((client) => client.stripe_customer_id === customer) : [];
    const customerWarning = $("#customer-warning");
    customerWarning.hidden = backing.length === 0;
    customerWarning.textContent = backing.length
      ? `This customer already backs ${backing.map((client) => `“${client.nickname}”`).join(", ")}: `
        + "their units add up on the same Stripe invoice."
      : "";
  }

  function clientFormBody(form) {
    const provider = form.elements.provider.value;
    const chargeBy = form.elements.charge_by.value;
    const unitText = form.elements.billing_unit.value.trim();
    const body = {
      nickname: form.elements.nickname.value.trim(),
      provider,
      stripe_product_id: form.elements.stripe_product_id.value,
      stripe_price_id: form.elements.stripe_price_id.value,
      stripe_customer_id: form.elements.stripe_customer_id.value.trim(),
      charge_by: chargeBy,
      // Sent as typed when it is not a whole number, so the API's message explains it.
      billing_unit: /^\d+$/.test(unitText) ? Number(unitText) : unitText,
      pause_on_payment_failure: form.elements.pause_on_payment_failure.checked,
      monthly_cap_units: wholeOrText(form.elements.monthly_cap_units.value),
      monthly_cap_amount: form.elements.monthly_cap_amount.value.trim() || null,
      alert_thresholds: form.elements.alert_thresholds.value.trim()
        ? form.elements.alert_thresholds.value.split(",").map((part) => wholeOrText(part))
        : null,
    };
    if (provider === "ghl") {
      body.location_id = form.elements.location_id.value;
      if (chargeBy === "messages") body.message_source = form.elements.message_source.value;
    } else {
      body.channel_id = form.elements.channel_id.value.trim();
    }
    return body;
  }

  // A whole number as a number, blank as null, anything else as typed (the API's message explains it).
  function wholeOrText(value) {
    const text = String(value).trim();
    if (!text) return null;
    return /^\d+$/.test(text) ? Number(text) : text;
  }

  async function saveClient(event) {
    event.preventDefault();
    const form = $("#client-form");
    clearErrors(form);
    const body = clientFormBody(form);
    const save = $("#client-save");
    save.disabled = true;
    try {
      let saved;
      if (state.editing) {
        saved = await api("PATCH", `/clients/${state.editing.id}`, body);
      } else {
        if (!$("#bill-unmapped-row").hidden) body.bill_unmapped_usage = $("#f-bill-unmapped").checked;
        if ($("#f-dry-run").checked) body.status = "shadow";
        saved = await api("POST", "/clients", body);
      }
      $("#client-dialog").close();
      location.hash = `#client/${saved.id}`;
      if (state.editing) await route();
    } catch (error) {
      if (error.status === 422 || error.status === 403) {
        const fields = { ...error.fields };
        if (!Object.keys(fields).length) fields._form = error.message;
        showErrors(form, fields);
      } else {
        showErrors(form, { _form: error.message });
      }
    } finally {
      save.disabled = false;
    }
  }

  function clearErrors(form) {
    for (const node of $$(".field-error", form)) {
      node.textContent = "";
      node.hidden = true;
    }
    for (const input of $$("[aria-invalid]", form)) input.removeAttribute("aria-invalid");
  }

  function showErrors(form, fields) {
    let first = null;
    for (const [name, message] of Object.entries(fields)) {
      const slot = $(`.field-error[data-error-for="${CSS.escape(name)}"]`, form) ||
        $('.field-error[data-error-for="_form"]', form);
      const prefix = slot.dataset.errorFor === name ? "" : `${name}: `;
      slot.textContent = slot.textContent ? `${slot.textContent} ${prefix}${message}` : `${prefix}${message}`;
      slot.hidden = false;
      const input = form.elements[name];
      if (input && input.setAttribute) {
        input.setAttribute("aria-invalid", "true");
        first = first || input;
      }
    }
    if (first && first.focus) first.focus();
  }

  // ---- unmapped usage -------------------------------------------------------------------------------
  async function showUnmapped() {
    const rows = (await api("GET", "/unmapped-usage")).unmapped;
    const admin = state.session && state.session.can_manage_billing;
    $("#unmapped-table tbody").replaceChildren(...rows.map((row) => {
      const isChannel = Boolean(row.channel_id);
      const name = isChannel ? `API channel ${row.channel_id}` : `Subaccount ${row.subaccount_name || row.location_id}`;
      const add = admin ? el("button", {
        type: "button",
        text: "Add as client",
        onclick: () => openClientDialog({ prefill: isChannel
          ? { provider: "capri_api", channel_id: row.channel_id, nickname: row.channel_id }
          : { provider: "ghl", location_id: row.location_id, nickname: row.subaccount_name || row.location_id } }),
      }) : "";
      return el("tr", {},
        cell("Source", name),
        cell("Tokens", fmt(row.tokens), "num"),
        cell("Messages", fmt(row.messages), "num"),
        cell("Events", fmt(row.events), "num"),
        cell("First seen", when(row.first_seen)),
        cell("Last seen", when(row.last_seen)),
        cell("", add));
    }));
    $("#unmapped-empty").hidden = rows.length > 0;
    $("#unmapped-table").hidden = rows.length === 0;
  }

  // ---- Stripe ----------------------------------------------------------------------------------------
  async function showStripe() {
    renderStripe(await loadStripe());
  }

  function renderStripe(stripe) {
    state.stripe = stripe;
    const facts = stripe.connected
      ? [
        ["Status", stripe.status === "ok" ? "Connected" : `Needs attention: ${stripe.problem || stripe.status}`],
        ["Account", stripe.account],
        ["Mode", stripe.mode === "live" ? "Live" : "Test"],
        ["Key", `…${stripe.last4}`],
        ["Stripe events", stripe.events.status === "registered"
          ? "Received (failed payments, subscription changes)"
          : stripe.events.problem || "Not registered: connect the key again"],
        ["Meter errors", !stripe.events.meter_errors || stripe.events.meter_errors.status === "none"
          ? "Not registered: connect the key again"
          : stripe.events.meter_errors.status === "registered"
            ? "Received (units Stripe rejects after accepting them)"
            : stripe.events.meter_errors.problem],
      ]
      : [["Status", "Not connected"]];
    $("#stripe-facts").replaceChildren(...facts.flatMap(([term, value]) => [el("dt", { text: term }), el("dd", { text: value })]));
    $("#stripe-connect").textContent = stripe.connected ? "Replace key" : "Connect";
    $("#stripe-disconnect").hidden = !stripe.connected;
  }

  async function connectStripe(event, confirmed = false) {
    if (event) event.preventDefault();
    const form = $("#stripe-form");
    clearErrors(form);
    $("#stripe-change").hidden = true;
    const input = $("#stripe-key");
    const button = $("#stripe-connect");
    button.disabled = true;
    try {
      const body = { api_key: input.value.trim() };
      if (confirmed) body.confirm_account_change = true;
      const stripe = await api("PUT", "/stripe-key", body);
      input.value = "";
      renderStripe(stripe);
      state.products = null;
      notify(`Connected to Stripe account ${stripe.account} (${stripe.mode} mode).`, "ok");
    } catch (error) {
      if (error.status === 409 && error.confirm) {
        // Another Stripe account or mode: say what connecting it would do; only the button sends it again.
        $("#stripe-change-text").textContent = error.message;
        $("#stripe-change").hidden = false;
      } else {
        showErrors(form, Object.keys(error.fields).length ? error.fields : { api_key: error.message });
      }
    } finally {
      button.disabled = false;
    }
  }

  async function disconnectStripe() {
    try {
      renderStripe(await api("DELETE", "/stripe-key"));
      state.products = null;
      notify("Stripe disconnected. No units are sent until a key is connected again.", "ok");
    } catch (error) {
      notify(error.message);
    }
  }

  // ---- API keys -------------------------------------------------------------------------------------
  async function showApiKeys() {
    const keys = (await api("GET", "/api-keys")).api_keys;
    const admin = state.session && state.session.can_manage_billing;
    $("#api-keys-table tbody").replaceChildren(...keys.map((key) => el("tr", { dataset: { keyId: key.id } },
      cell("Prefix", el("code", { text: `${key.prefix}_…` })),
      cell("Name", key.name || ""),
      cell("Created", when(key.created_at)),
      cell("Last used", when(key.last_used_at)),
      cell("Status", el("span", { className: `badge ${key.revoked_at ? "revoked" : "active"}`,
        text: key.revoked_at ? "revoked" : "active" })),
      cell("", admin && !key.revoked_at
        ? el("button", { type: "button", className: "danger", text: "Revoke", onclick: () => revokeApiKey(key) })
        : ""),
    )));
    $("#api-keys-empty").hidden = keys.length > 0;
    $("#api-keys-table").hidden = keys.length === 0;
  }

  async function createApiKey(event) {
    event.preventDefault();
    const input = $("#api-key-name");
    try {
      const created = await api("POST", "/api-keys", { name: input.value.trim() || null });
      input.value = "";
      $("#new-key-value").textContent = created.key;
      $("#new-key").hidden = false;
      await showApiKeys();
    } catch (error) {
      notify(error.message);
    }
  }

  async function revokeApiKey(key) {
    try {
      await api("DELETE", `/api-keys/${key.id}`);
      await showApiKeys();
    } catch (error) {
      notify(error.message);
    }
  }

  // ---- spend alerts ---------------------------------------------------------------------------------
  async function showAlerts() {
    const agencyUser = state.session.sees_agency_settings;
    const [listed, settings] = await Promise.all([
      api("GET", "/alerts"),
      agencyUser ? api("GET", "/alert-settings") : Promise.resolve(null),
    ]);
    if (settings) $("#alert-url").value = settings.url || "";
    $("#alerts-table tbody").replaceChildren(...listed.alerts.map((alert) => el("tr", {},
      cell("When", when(alert.created_at)),
      cell("Client", el("a", { href: `#client/${alert.client_id}`, text: alert.client_nickname })),
      cell("Threshold", `${alert.threshold_percent} %`),
      cell("Units / cap", `${fmt(alert.units)} / ${fmt(alert.cap_units)}`, "num"),
      cell("Delivery", alert.deliveries.length === 0 ? "portal only" : el("span", {}, ...alert.deliveries.map(deliveryLabel))),
    )));
    $("#alerts-empty").hidden = listed.alerts.length > 0;
    $("#alerts-table").hidden = listed.alerts.length === 0;
  }

  function deliveryLabel(delivery) {
    const outcome = delivery.last_status_code ? `HTTP ${delivery.last_status_code}` : delivery.last_error || "";
    const note = `${delivery.attempts} attempt(s)${outcome ? `, last: ${outcome}` : ""}`;
    return el("span", { className: `badge ${delivery.status === "delivered" ? "sent" : delivery.status}`,
      text: delivery.status, title: note });
  }

  async function saveAlertSettings(newSecret) {
    const error = $("#alert-url-error");
    error.hidden = true;
    const url = $("#alert-url").value.trim() || null;
    try {
      const saved = await api("PUT", "/alert-settings", { url, new_secret: newSecret });
      $("#alert-secret").hidden = !saved.secret;
      $("#alert-secret-value").textContent = saved.secret || "";
      notify("Alert settings saved.", "ok");
    } catch (failure) {
      error.textContent = failure.fields.url || failure.message;
      error.hidden = false;
    }
  }

  // ---- start ----------------------------------------------------------------------------------------
  function wire() {
    window.addEventListener("hashchange", route);
    $("#add-client").addEventListener("click", () => openClientDialog().catch((error) => notify(error.message)));
    const form = $("#client-form");
    form.addEventListener("submit", saveClient);
    form.addEventListener("change", (event) => {
      if (event.target.name === "stripe_product_id") fillPrices();
      syncDialog();
    });
    form.addEventListener("input", syncDialog);
    $("#client-cancel").addEventListener("click", () => $("#client-dialog").close());
    wirePicker();
    $("#stripe-form").addEventListener("submit", connectStripe);
    $("#stripe-disconnect").addEventListener("click", disconnectStripe);
    $("#stripe-change-confirm").addEventListener("click", () => connectStripe(null, true));
    $("#stripe-change-cancel").addEventListener("click", () => { $("#stripe-change").hidden = true; });
    $("#api-key-form").addEventListener("submit", createApiKey);
    $("#alert-settings-form").addEventListener("submit", (event) => {
      event.preventDefault();
      saveAlertSettings(false);
    });
    $("#alert-new-secret").addEventListener("click", () => saveAlertSettings(true));
    $("#new-key-copy").addEventListener("click", () => {
      navigator.clipboard.writeText($("#new-key-value").textContent).catch(() => {});
    });
  }

  async function start() {
    wire();
    try {
      await signIn();
    } catch (error) {
      $("#signing-in-text").textContent = error.message;
      // Opened outside GoHighLevel (nobody answered the handshake): say how to open it, offer the demo.
      $("#outside-ghl").hidden = window.parent !== window && !/GoHighLevel did not answer/.test(error.message);
      const demoUrl = document.body.dataset.demoUrl;
      if (demoUrl) {
        $("#demo-link").href = demoUrl;
        $("#demo-offer").hidden = false;
      }
      return;
    }
    const session = state.session;
    $("#who").textContent = `${session.can_manage_billing ? "Agency admin" : "Read only"}${session.demo ? " · demo" : ""}`;
    document.body.classList.toggle("read-only", !session.can_manage_billing);
    for (const node of $$("[data-admin-only]")) node.hidden = !session.can_manage_billing;
    for (const node of $$("[data-agency-only]")) node.hidden = !session.sees_agency_settings;
    $("#signing-in").hidden = true;
    $("#portal").hidden = false;
    await route();
    startPolling();
  }

  document.addEventListener("DOMContentLoaded", start);
})();
