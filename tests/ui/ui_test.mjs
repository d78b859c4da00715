// Headless-Chromium test of meshfed's debug UI, run by tests/debug_surface.rs.
//
// Usage: node ui_test.mjs EXPECTED.json
//
// EXPECTED.json: {
//   "base": "http://127.0.0.1:PORT",          meshfed's debug address
//   "proxy": "client-0.shop",                 a connected proxy
//   "cluster": "outbound|9080||reviews...",   an Envoy cluster of the proxy
//   "priorities": {"REGION/ZONE": P, ...},    that cluster's locality priorities in the proxy's EDS
//   "newEndpoint": "127.x.y.z",               an endpoint the test adds once this script prints READY
//   "artifacts": "/path/to/tests/artifacts",  where screenshots go
//   "chromium": "/usr/bin/chromium",
//   "token": "..."                             the debug token, if meshfed requires one
// }
//
// Checks: the overview shows the clusters, services and the proxy (all four types SYNCED); it updates
// live (the new endpoint appears without a reload); the proxy page shows the same priorities as the
// EDS, with reasons that follow the locality rules; no page logs a console error or throws. Writes
// screenshots. Prints progress on stdout ("READY" when the test may add the endpoint); exits 1 with a
// message on stderr on failure. Every wait is bounded.

import { mkdtempSync, rmSync, readFileSync, mkdirSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { chromium } from "playwright-core";

const WAIT_MS = 20000;
const expected = JSON.parse(readFileSync(process.argv[2], "utf8"));
const problems = [];

function fail(message) {
  throw new Error(message);
}

const userDataDir = mkdtempSync(join(tmpdir(), "meshfed-ui-chromium-"));
let context;
try {
  context = await chromium.launchPersistentContext(userDataDir, {
    executablePath: expected.chromium,
    headless: true,
    viewport: { width: 1440, height: 1000 },
    args: [
      "--headless",
      "--no-sandbox",
      "--disable-gpu",
      "--disable-quic",
      "--no-first-run",
      "--disable-background-networking",
      "--disable-component-update",
      "--disable-sync",
    ],
    timeout: WAIT_MS,
  });
  context.setDefaultTimeout(WAIT_MS);
  const page = context.pages()[0] ?? (await context.newPage());
  // until the token is entered, the JSON endpoints answer 401 (that is how the page knows to ask)
  let tokenEntered = !expected.token;
  page.on("console", (msg) => {
    const expected401 = !tokenEntered && msg.text().includes("401");
    if (msg.type() === "error" && !expected401) problems.push(`console error on ${page.url()}: ${msg.text()}`);
  });
  page.on("pageerror", (err) => problems.push(`uncaught exception on ${page.url()}: ${err.message}`));
  page.on("requestfailed", (req) => {
    // polls in flight when the page navigates away are aborted: not a problem
    const error = req.failure()?.errorText ?? "";
    if (!error.includes("ERR_ABORTED")) problems.push(`request failed: ${req.url()}: ${error}`);
  });
  page.on("response", (res) => {
    if (res.status() >= 400 && !(res.status() === 401 && !tokenEntered)) {
      problems.push(`HTTP ${res.status()} for ${res.url()}`);
    }
  });
  mkdirSync(expected.artifacts, { recursive: true });

  // ---- overview ----
  await page.goto(expected.base + "/", { waitUntil: "load" });
  if (expected.token) {
    // the page asks for the token (the JSON endpoints answer 401 without it), then reloads with it
    await page.waitForSelector("#token-form #token-input");
    console.log("overview: the page asks for the debug token");
    await page.fill("#token-input", expected.token);
    await Promise.all([page.waitForNavigation(), page.click("#token-form button")]);
    tokenEntered = true;
  }
  await page.waitForSelector('body[data-loaded="1"]');
  for (const c of ["aws-use1", "azure-weu"]) {
    await page.waitForSelector(`.cluster-card[data-cluster="${c}"]`);
    const text = await page.locator(`.cluster-card[data-cluster="${c}"]`).innerText();
    if (!text.includes("synced")) fail(`cluster ${c} is not shown synced: ${text}`);
  }
  for (const s of ["frontend", "reviews", "ratings"]) {
    await page.waitForSelector(`.service[data-service="shop/${s}"]`);
  }
  const row = `tr[data-proxy="${expected.proxy}"]`;
  await page.waitForSelector(row);
  await page.waitForFunction(
    (sel) => {
      const r = document.querySelector(sel);
      return r && [...r.querySelectorAll(".badge")].filter((b) => b.textContent === "SYNCED").length === 4;
    },
    row,
  );
  // the Traffic panel (drains and drills): the demo has none, and says so
  const traffic = await page.locator("#traffic .body").innerText();
  if (!traffic.includes("No drain and no drill")) fail(`the Traffic panel shows: ${traffic}`);
  const clouds = await page.locator(".cloud h3").allInnerTexts();
  console.log(`overview: clouds ${JSON.stringify(clouds)}`);

  // Live: the test adds an endpoint now; it must appear without a reload.
  const navigations = [];
  page.on("framenavigated", (f) => {
    if (f === page.mainFrame()) navigations.push(f.url());
  });
  console.log("READY");
  await page.waitForFunction(
    (addr) => [...document.querySelectorAll('.service[data-service="shop/reviews"] .ep')].some((e) => e.textContent === addr),
    expected.newEndpoint,
  );
  if (navigations.length) fail(`the page reloaded: ${navigations}`);
  console.log(`overview: ${expected.newEndpoint} appeared live`);
  await page.screenshot({ path: join(expected.artifacts, "debug-ui-overview.png"), fullPage: true });

  // ---- proxy page, through the link ----
  await page.click(`${row} a`);
  await page.waitForURL((u) => u.pathname === "/ui/proxy");
  await page.waitForSelector('body[data-loaded="1"]');
  const table = `.explain[data-envoy-cluster="${expected.cluster}"] tr.locality-row`;
  await page.waitForSelector(table);
  const rows = await page.locator(table).evaluateAll((trs) =>
    trs.map((tr) => ({
      locality: tr.getAttribute("data-locality"),
      priority: Number(tr.getAttribute("data-priority")),
      shown: tr.querySelector("td").textContent.trim(),
      rule: tr.getAttribute("data-rule"),
      reason: tr.querySelector("td.reason").textContent,
    })),
  );
  console.log(`proxy page: ${JSON.stringify(rows)}`);
  const seen = {};
  for (const r of rows) {
    if (String(r.priority) !== r.shown) fail(`row ${r.locality}: priority attribute ${r.priority}, shown ${r.shown}`);
    if (seen[r.locality] !== undefined && seen[r.locality] !== r.priority) fail(`${r.locality} has two priorities`);
    seen[r.locality] = r.priority;
    if (!r.reason) fail(`no reason for ${r.locality}`);
  }
  const want = expected.priorities;
  for (const [locality, priority] of Object.entries(want)) {
    if (seen[locality] !== priority) fail(`${locality}: UI shows priority ${seen[locality]}, EDS has ${priority}`);
  }
  for (const locality of Object.keys(seen)) {
    if (want[locality] === undefined) fail(`UI shows ${locality}, which the EDS does not have`);
  }
  // Reasons follow the locality rules for a proxy in us-east-1/us-east-1a.
  for (const r of rows) {
    const rule = r.locality === "us-east-1/us-east-1a" ? "same zone" : r.locality.startsWith("us-east-1/") ? "same region" : "other region";
    if (!r.reason.startsWith(rule)) fail(`${r.locality}: reason "${r.reason}" should start with "${rule}"`);
  }
  const locality = await page.locator("#proxy-locality").innerText();
  if (locality !== "us-east-1/us-east-1a") fail(`proxy locality shown as ${locality}`);
  const dumpLink = await page.locator("#config-dump-link").getAttribute("href");
  if (!dumpLink.includes("include_eds=true")) fail(`config dump link ${dumpLink}`);
  await page.screenshot({ path: join(expected.artifacts, "debug-ui-proxy.png"), fullPage: true });

  // ---- the config dump it links to, and the debug index ----
  const dump = await page.goto(expected.base + dumpLink);
  if (dump.status() !== 200) fail(`config dump link: HTTP ${dump.status()}`);
  const index = await page.goto(expected.base + "/debug");
  if (index.status() !== 200) fail(`/debug: HTTP ${index.status()}`);
  await page.waitForSelector("table.grid a");

  if (problems.length) fail(problems.join("\n"));
  console.log("PASS");
} catch (e) {
  console.error(`UI test failed: ${e.message}`);
  if (problems.length) console.error(problems.join("\n"));
  process.exitCode = 1;
} finally {
  if (context) await context.close().catch(() => {});
  rmSync(userDataDir, { recursive: true, force: true });
}
