// Drives the real analytics.js (@segment/analytics-next, its browser build) in Debian's Chromium against
// `idstitch serve`, for tests/test_tracking_clients.py.
//
//   node browser.mjs IDSTITCH_URL WRITE_KEY SCENARIO_JSON
//
// SCENARIO_JSON is a file holding {"strategy": "standard" | "batching", "devices": [device, ...]}, each
// device {"anonymousId": "a1" | null, "calls": [["page", "Home"], ["identify", "u1", {...}], ...]}: the
// method of the `analytics` object and its arguments, exactly as a site calls them. Each device is a
// fresh browser context (its own cookies and localStorage, as a second phone or laptop would have),
// run one after the other.
//
// The page is served by this script on http://localhost:PORT, so idstitch at http://127.0.0.1:PORT is
// another origin: every delivery crosses CORS, preflight included (the library sends Authorization).
// analytics.js reads its settings from idstitch (GET /v1/projects/{writeKey}/settings), which names
// idstitch as where to send; any request to a third origin is reported: the test needs no network and
// sees a library that tried to reach Segment.
//
// Exits 1 when a delivery failed (a fetch that threw, which is what a CORS refusal looks like to the
// page, or a status other than 200), a request went elsewhere, or the page logged an error. On success
// it prints one JSON line: {"devices", "requests": [{"path", "status", "events"}], "events"}.

import { createServer } from 'node:http'
import { readFileSync } from 'node:fs'
import { dirname, join } from 'node:path'
import { createRequire } from 'node:module'
import { chromium } from 'playwright-core'

const [idstitchUrl, writeKey, scenarioPath] = process.argv.slice(2)
if (!idstitchUrl || !writeKey || !scenarioPath) {
  console.error('usage: node browser.mjs IDSTITCH_URL WRITE_KEY SCENARIO_JSON')
  process.exit(2)
}
const scenario = JSON.parse(readFileSync(scenarioPath, 'utf8'))
const require = createRequire(import.meta.url)
const bundle = join(dirname(require.resolve('@segment/analytics-next/package.json')), 'dist', 'umd')
const chromiumPath = process.env.IDSTITCH_CHROMIUM ?? '/usr/bin/chromium'

const PAGE = `<!doctype html>
<html><head><meta charset="utf-8"><title>idstitch browser test</title><link rel="icon" href="data:,">
<script src="/analytics.js"></script></head>
<body><p>A customer's site.</p></body></html>`

// The customer's site: the page, and analytics.js's browser build (npm's dist/umd), as a site hosts it.
const site = createServer((request, response) => {
  const path = new URL(request.url, 'http://localhost').pathname
  if (path === '/') {
    response.writeHead(200, { 'content-type': 'text/html; charset=utf-8' })
    response.end(PAGE)
  } else if (path === '/analytics.js') {
    response.writeHead(200, { 'content-type': 'text/javascript' })
    response.end(readFileSync(join(bundle, 'index.js')))
  } else {
    response.writeHead(404)
    response.end()
  }
})
await new Promise((resolve) => site.listen(0, '127.0.0.1', resolve))
const siteOrigin = `http://localhost:${site.address().port}`
const idstitchOrigin = new URL(idstitchUrl).origin

const failures = []
const requests = []
let events = 0

// Runs in the page: record every delivery the library makes, load analytics.js as a site does with its
// cdnURL on idstitch, make the calls, wait for the deliveries.
async function runDevice({ writeKey, idstitchOrigin, strategy, anonymousId, calls, expected }) {
  const deliveries = []
  const realFetch = window.fetch
  window.fetch = async (url, init) => {
    if ((init?.method ?? 'GET').toUpperCase() !== 'POST') {
      return realFetch(url, init) // the settings
    }
    const body = JSON.parse(init?.body ?? '{}')
    const count = Array.isArray(body.batch) ? body.batch.length : 1
    try {
      const response = await realFetch(url, init)
      deliveries.push({ path: new URL(url).pathname, status: response.status, events: count })
      return response
    } catch (error) {
      deliveries.push({ path: new URL(url).pathname, error: String(error), events: count })
      throw error
    }
  }
  // Only the host changes: the settings come from idstitch (as they would from Segment's CDN) and
  // name it as where to send. The batching strategy is the site's own choice, as with Segment.
  const options =
    strategy === 'batching'
      ? { integrations: { 'Segment.io': { deliveryStrategy: { strategy: 'batching', config: { size: 100, timeout: 200 } } } } }
      : {}
  const [analytics] = await window.AnalyticsNext.AnalyticsBrowser.load({ writeKey, cdnURL: idstitchOrigin }, options)
  if (anonymousId) {
    analytics.setAnonymousId(anonymousId)
  }
  for (const [method, ...args] of calls) {
    await analytics[method](...args)
  }
  const deadline = Date.now() + 20000
  const delivered = () => deliveries.reduce((sum, item) => sum + (item.status === 200 ? item.events : 0), 0)
  const failed = () => deliveries.some((item) => item.status !== 200)
  while (delivered() < expected && !failed() && Date.now() < deadline) {
    await new Promise((resolve) => setTimeout(resolve, 20))
  }
  return deliveries
}

const browser = await chromium.launch({
  executablePath: chromiumPath,
  args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking'],
})
try {
  for (const [index, device] of scenario.devices.entries()) {
    const context = await browser.newContext()
    // Watched, not intercepted: with interception on, Playwright answers CORS preflights itself, and
    // idstitch's own answer is what this test is about.
    context.on('request', (request) => {
      const origin = new URL(request.url()).origin
      if (origin !== siteOrigin && origin !== idstitchOrigin) {
        failures.push(`device ${index}: request to another origin: ${request.url()}`)
      }
    })
    const page = await context.newPage()
    page.on('console', (message) => {
      if (message.type() === 'error') {
        failures.push(`device ${index}: console error: ${message.text()} (${message.location().url})`)
      }
    })
    page.on('pageerror', (error) => failures.push(`device ${index}: page error: ${error}`))
    await page.goto(`${siteOrigin}/`)
    const deliveries = await page.evaluate(runDevice, {
      writeKey,
      idstitchOrigin,
      strategy: scenario.strategy,
      anonymousId: device.anonymousId,
      calls: device.calls,
      expected: device.calls.length,
    })
    let sent = 0
    for (const delivery of deliveries) {
      requests.push(delivery)
      if (delivery.status !== 200) {
        failures.push(`device ${index}: ${delivery.path}: ${delivery.error ?? `HTTP ${delivery.status}`}`)
      } else {
        sent += delivery.events
      }
    }
    events += sent
    if (sent !== device.calls.length) {
      failures.push(`device ${index}: ${sent} of ${device.calls.length} calls delivered`)
    }
    await context.close()
  }
} finally {
  await browser.close()
  site.close()
}

if (failures.length) {
  console.error(failures.join('\n'))
  process.exit(1)
}
console.log(JSON.stringify({ devices: scenario.devices.length, requests, events }))
