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
//   "token": "...",                            the debug token, if meshfed requires one
//   "traffic": {                               the mesh config's traffic: split and what it decides
//     "host": "ratings...",                    the split service
//     "shares": {REGION: {CLUSTER: %}},        its shares per source region
//     "drain": "azure-weu",                    the cluster the what-if drains, and the drill drains
//     "whatif": [{"proxy": "POD.NS",           /debug/whatif for connected proxies and the host:
//                 "now": {CLUSTER: %},         the shares now
//                 "drained": {CLUSTER: %}}],   ... and with "drain" drained to 0
//     "drilled": {REGION: {CLUSTER: %}},       the shares once the drill (50% step) is in force
//     "proxies": 2                             the proxies connected (each ACKs the drill's step)
//   }
// }
//
// Checks: the overview shows the clusters, services and the proxy (all four types SYNCED); it updates
// live (the new endpoint appears without a reload); the proxy page shows the same priorities as the
// EDS, with reasons that follow the locality rules; the traffic page shows the split's shares per
// source region, the what-if form shows /debug/whatif's shares now and with a cluster drained (and its
// errors as text), and a drill started while the page is open appears with its step, its drain and the
// shares it causes, without a reload and without clearing the form; no page logs a console error or
// throws. Writes screenshots. Prints progress on stdout ("READY" when the test may add the endpoint,
// "DRILL" when it may start the drill); exits 1 with a message on stderr on failure. Every wait is bounded.

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
  // while the test asks /debug/whatif for what it must refuse (unknown proxy, unknown host)
  let whatifErrorsExpected = false;
  const expectedWhatifError = (url) => whatifErrorsExpected && url.includes("/debug/whatif");
  page.on("console", (msg) => {
    const expected401 = !tokenEntered && msg.text().includes("401");
    if (msg.type() === "error" && !expected401 && !expectedWhatifError(msg.location()?.url ?? "")) {
      problems.push(`console error on ${page.url()}: ${msg.text()}`);
    }
  });
  page.on("pageerror", (err) => problems.push(`uncaught exception on ${page.url()}: ${err.message}`));
  page.on("requestfailed", (req) => {
    // polls in flight when the page navigates away are aborted: not a problem
    const error = req.failure()?.errorText ?? "";
    if (!error.includes("ERR_ABORTED")) problems.push(`request failed: ${req.url()}: ${error}`);
  });
  page.on("response", (res) => {
    if (res.status() >= 400 && !(res.status() === 401 && !tokenEntered) && !expectedWhatifError(res.url())) {
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
  // the Traffic panel: a summary of the traffic page (the split decides ratings; no drain, no drill)
  await page.waitForSelector("#traffic .traffic-summary");
  const traffic = await page.locator("#traffic .body").innerText();
  if (!/1 service\(s\) decided .* 0 drain\(s\) in force .* 0 drill\(s\) in progress/.test(traffic)) {
    fail(`the Traffic panel shows: ${traffic}`);
  }
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

  // ---- traffic page, through the proxy page's what-if link (the form has the proxy) ----
  const t = expected.traffic;
  await page.click("#whatif-link");
  await page.waitForURL((u) => u.pathname === "/ui/traffic");
  await page.waitForSelector('body[data-loaded="1"]');
  if ((await page.inputValue("#whatif-proxy")) !== expected.proxy) fail("the what-if link does not fill in the proxy");

  // the share table: what the split decides, per source region and cluster
  const near = (a, b) => Math.abs(Number(a) - Number(b)) < 0.05;
  async function sharesShown(host) {
    return page.locator(`tr.share-row[data-service="${host}"]`).evaluateAll((trs) =>
      Object.fromEntries(
        trs.map((tr) => [
          tr.getAttribute("data-region"),
          Object.fromEntries(
            [...tr.querySelectorAll("td.share[data-share]")].map((td) => [
              td.getAttribute("data-cluster"),
              {
                share: Number(td.getAttribute("data-share")),
                shown: td.querySelector(".share-value b").textContent,
                why: [...td.querySelectorAll(".why .badge")].map((b) => b.textContent),
                reason: td.querySelector(".reason").textContent,
              },
            ]),
          ),
        ]),
      ),
    );
  }
  // true when the table shows `want` (region -> cluster -> %; "*": any other region, with a drain) and no
  // other row for the host
  function sameShares(shown, want) {
    const regions = Object.keys(want).sort();
    if (JSON.stringify(Object.keys(shown).sort()) !== JSON.stringify(regions)) return false;
    return regions.every((r) => {
      if (want[r] === "*") return true;
      const clusters = Object.keys(shown[r]).sort();
      if (JSON.stringify(clusters) !== JSON.stringify(Object.keys(want[r]).sort())) return false;
      return clusters.every((c) => near(shown[r][c].share, want[r][c]) && shown[r][c].shown === `${want[r][c]}%`);
    });
  }
  async function waitShares(want, what) {
    const until = Date.now() + WAIT_MS;
    let shown;
    for (;;) {
      shown = await sharesShown(t.host);
      if (sameShares(shown, want)) return shown;
      if (Date.now() > until) fail(`${what}: the share table shows ${JSON.stringify(shown)}, want ${JSON.stringify(want)}`);
      await page.waitForTimeout(200);
    }
  }
  const split = await waitShares(t.shares, "the split");
  for (const [region, row] of Object.entries(split)) {
    if (t.shares[region] === "*") continue;
    for (const [cluster, cell] of Object.entries(row)) {
      if (!cell.why.includes("split")) fail(`${region}/${cluster}: why ${cell.why}`);
      if (!cell.reason.includes(`split ${t.shares[region][cluster]}%`)) fail(`${region}/${cluster}: reason "${cell.reason}"`);
    }
  }
  console.log(`traffic page: shares ${JSON.stringify(t.shares)}`);
  await page.waitForSelector("#drains-empty");
  await page.waitForSelector("#drills-empty");

  // what-if: the sidecar's requests to the host now, and with the drained cluster
  async function askWhatIf(proxy, host, drain) {
    await page.fill("#whatif-proxy", proxy);
    await page.fill("#whatif-host", host);
    await page.selectOption("#whatif-drain", drain);
    await page.click("#whatif-form button");
    await page.waitForSelector('#whatif-result[data-state="ok"], #whatif-result[data-state="error"]');
    return page.locator("#whatif-result").getAttribute("data-state");
  }
  for (const want of t.whatif) {
    // (the proxy typed, POD.NS, or picked from the connected proxies)
    if ((await askWhatIf(want.proxy, t.host, t.drain)) !== "ok") {
      fail(`what-if ${want.proxy}: ${await page.locator("#whatif-result").innerText()}`);
    }
    const whatif = await page.locator("tr.whatif-cluster").evaluateAll((trs) =>
      trs.map((tr) => ({
        cluster: tr.getAttribute("data-cluster"),
        now: Number(tr.getAttribute("data-now")),
        whatif: Number(tr.getAttribute("data-whatif")),
        shown: [tr.querySelector("td.now").textContent, tr.querySelector("td.whatif").textContent],
      })),
    );
    console.log(`traffic page: what-if ${want.proxy} ${JSON.stringify(whatif)}`);
    const clustersShown = whatif.map((r) => r.cluster).sort();
    if (JSON.stringify(clustersShown) !== JSON.stringify(Object.keys(want.now).sort())) {
      fail(`what-if ${want.proxy} shows clusters ${clustersShown}, /debug/whatif has ${Object.keys(want.now)}`);
    }
    for (const r of whatif) {
      const now = want.now[r.cluster];
      const then = want.drained[r.cluster] ?? 0;
      if (!near(r.now, now) || !near(r.whatif, then)) {
        fail(`what-if ${want.proxy} ${r.cluster}: shows ${r.now} -> ${r.whatif}, want ${now} -> ${then}`);
      }
      if (r.shown[0] !== `${Math.round(now * 10) / 10}%` || r.shown[1] !== `${Math.round(then * 10) / 10}%`) {
        fail(`what-if ${want.proxy} ${r.cluster}: text ${r.shown}`);
      }
    }
    const summary = await page.locator("#whatif-summary").innerText();
    if (!summary.includes(`${t.drain} drained to 0`)) fail(`what-if summary: ${summary}`);
    if (!summary.includes("region us-east-1")) fail(`what-if summary: ${summary}`);
  }
  // the last proxy (the Envoy, without mesh certificates) gets none of Azure's decided share: said
  const why = await page.locator(`tr.whatif-cluster[data-cluster="${t.drain}"] td.reason`).first().innerText();
  if (!why.includes("no endpoint of")) fail(`what-if: why for ${t.drain}: "${why}"`);
  const localities = await page.locator("tr.whatif-locality").evaluateAll((trs) =>
    trs.map((tr) => [Number(tr.getAttribute("data-now")), Number(tr.getAttribute("data-whatif"))]),
  );
  const sum = (i) => localities.reduce((a, l) => a + l[i], 0);
  if (!localities.length || Math.abs(sum(0) - 100) > 0.5 || Math.abs(sum(1) - 100) > 0.5) {
    fail(`what-if localities ${JSON.stringify(localities)} do not add up to 100% each`);
  }
  // errors are shown as text
  whatifErrorsExpected = true;
  for (const [proxy, host, want] of [
    [expected.proxy, "nope.shop.svc.cluster.local", "no service with hostname"],
    ["nobody.shop", t.host, "not connected"],
  ]) {
    if ((await askWhatIf(proxy, host, "")) !== "error") fail(`what-if ${proxy} ${host}: not an error`);
    const text = await page.locator("#whatif-error").innerText();
    if (!text.includes(want) || !text.includes("HTTP 404")) fail(`what-if ${proxy} ${host}: error shown as "${text}"`);
  }
  console.log("traffic page: what-if errors shown");
  if ((await askWhatIf(expected.proxy, t.host, "")) !== "ok") fail("what-if without hypothesis");
  whatifErrorsExpected = false;
  if ((await page.locator("tr.whatif-cluster td.whatif").count()) !== 0) fail("a what-if column without hypothesis");

  // a drill while the page is open: its drain, its step ACKed by the proxy, and the shares it causes
  console.log("DRILL");
  const drain = `tr.drain[data-target="cluster ${t.drain}"]`;
  await page.waitForSelector(drain);
  await page.waitForFunction((sel) => document.querySelector(`${sel} td.capacity-now`)?.textContent === "50%", drain);
  const drainText = await page.locator(drain).innerText();
  for (const want of ["in force", "−50% every 1 h", "UI test drill", "aborts below 10% healthy"]) {
    if (!drainText.includes(want)) fail(`drain row: "${drainText}" lacks "${want}"`);
  }
  await page.waitForSelector('.drill[data-active="1"] tr.step[data-capacity="50"][data-acked="1"]');
  const drillText = await page.locator('.drill[data-active="1"]').innerText();
  if (!drillText.includes("IN PROGRESS") || !drillText.includes(`${t.proxies} proxies`)) fail(`drill: ${drillText}`);
  // (a drain acts in every source region: a row for the regions the split does not name, "*")
  const drilled = await waitShares({ ...t.drilled, "*": "*" }, "the drill");
  for (const region of Object.keys(drilled)) {
    if (!drilled[region][t.drain]?.why.includes("drain")) fail(`drained cell in ${region}: ${JSON.stringify(drilled)}`);
  }
  if ((await page.inputValue("#whatif-proxy")) !== expected.proxy || (await page.inputValue("#whatif-host")) !== t.host) {
    fail("the polls cleared the what-if form");
  }
  console.log(`traffic page: drill shown, shares ${JSON.stringify(t.drilled)}`);
  // (the screenshot with a hypothesis: the first proxy, the cluster drained)
  if ((await askWhatIf(t.whatif[0].proxy, t.host, t.drain)) !== "ok") fail("what-if after the drill");
  await page.screenshot({ path: join(expected.artifacts, "debug-ui-traffic.png"), fullPage: true });

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
