// Sends Segment calls through the real @segment/analytics-node client, for tests/test_tracking_clients.py.
//
//   node send.mjs HOST WRITE_KEY CALLS_JSON [FLUSH_AT]
//
// CALLS_JSON is a file holding a list of calls, each `{"method": "track", ...params}` with the
// params exactly as analytics-node takes them (userId, anonymousId, event, traits, context, ...).
// The script calls closeAndFlush() and exits 1 if any call failed to deliver, any HTTP response was
// neither 200 nor 429 (overload, which the library waits out as SPEC §6 allows), or the library emitted
// an error: the test must see every failure, including ones the library retried away. On success it
// prints one JSON line: {"calls", "requests", "throttled", "statuses"}.

import { readFileSync } from 'node:fs'
import { Analytics } from '@segment/analytics-node'

const [host, writeKey, callsPath, flushAtArg] = process.argv.slice(2)
if (!host || !writeKey || !callsPath) {
  console.error('usage: node send.mjs HOST WRITE_KEY CALLS_JSON [FLUSH_AT]')
  process.exit(2)
}

const calls = JSON.parse(readFileSync(callsPath, 'utf8'))
const failures = []
const statuses = []
let throttled = 0
let requestsMade = 0

const analytics = new Analytics({
  writeKey,
  host,
  flushAt: flushAtArg ? Number(flushAtArg) : 15,
  // Few retries: a server failure must show up as a failure here, not hide behind backoff.
  maxRetries: 1,
  httpRequestTimeout: 20000,
})

analytics.on('error', (error) => {
  failures.push(`error event ${error.code}: ${error.reason}`)
})
// A request with no response failed on the network: the library retries it silently, the test must not.
analytics.on('http_request', () => {
  requestsMade += 1
})
analytics.on('http_response', (response) => {
  statuses.push(response.status)
  if (response.status === 429) {
    throttled += 1
  } else if (response.status !== 200) {
    failures.push(`HTTP ${response.status} ${response.statusText} from ${response.url}`)
  }
})

const methods = new Set(['identify', 'track', 'page', 'screen', 'group', 'alias'])
for (const { method, ...params } of calls) {
  if (!methods.has(method)) {
    console.error(`unknown method ${method}`)
    process.exit(2)
  }
  analytics[method](params, (error) => {
    if (error) {
      failures.push(`${method} ${params.messageId ?? ''}: ${error}`)
    }
  })
}

try {
  await analytics.closeAndFlush({ timeout: 30000 })
} catch (error) {
  failures.push(`closeAndFlush: ${error}`)
}

if (requestsMade !== statuses.length) {
  failures.push(`${requestsMade - statuses.length} of ${requestsMade} requests got no HTTP response`)
}
if (failures.length > 0) {
  console.error(failures.join('\n'))
  process.exit(1)
}
console.log(JSON.stringify({ calls: calls.length, requests: statuses.length, throttled, statuses }))
