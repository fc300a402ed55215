// Sends Segment calls through RudderStack's Node library (@rudderstack/rudder-sdk-node) or Segment's
// legacy one (analytics-node v6), for tests/test_tracking_clients.py. The two share one design (axios,
// axios-retry, `new Analytics(writeKey, options)`, a callback per call), so one script drives both.
//
//   node send-axios.mjs LIBRARY HOST WRITE_KEY CALLS_JSON [FLUSH_AT]
//
// LIBRARY is `@rudderstack/rudder-sdk-node` (gzip on, its default) or `analytics-node`. CALLS_JSON is as
// for send.mjs: `{"method": "track", ...params}`, a `timestamp` as an ISO string (made a Date here, as the
// libraries require). Exits 1 if any call failed, any HTTP response was neither 200 nor 429 (overload,
// which the libraries retry, as SPEC §6 allows), or a request got no response; else prints one JSON line:
// {"calls", "requests", "throttled", "statuses"}.

import { readFileSync } from 'node:fs'
import { createRequire } from 'node:module'

const [library, host, writeKey, callsPath, flushAtArg] = process.argv.slice(2)
if (!library || !host || !writeKey || !callsPath) {
  console.error('usage: node send-axios.mjs LIBRARY HOST WRITE_KEY CALLS_JSON [FLUSH_AT]')
  process.exit(2)
}
const libraries = new Set(['@rudderstack/rudder-sdk-node', 'analytics-node'])
if (!libraries.has(library)) {
  console.error(`unknown library ${library}`)
  process.exit(2)
}
const Analytics = createRequire(import.meta.url)(library)

const calls = JSON.parse(readFileSync(callsPath, 'utf8'))
const failures = []
const statuses = []
let throttled = 0
let requestsMade = 0
let settled = 0 // requests answered or failed: requestsMade - settled are in flight
let answered = 0

const analytics = new Analytics(writeKey, {
  // The only setting a site changes: RudderStack calls it dataPlaneUrl, Segment host.
  ...(library === 'analytics-node' ? { host } : { dataPlaneUrl: host, logLevel: 'error' }),
  flushAt: flushAtArg ? Number(flushAtArg) : 15,
  flushInterval: 50,
  retryCount: 3,
  timeout: 20000,
})

// Every attempt goes through the interceptors, the libraries' retries included: the test sees them all.
analytics.axiosInstance.interceptors.request.use((config) => {
  requestsMade += 1
  return config
})
analytics.axiosInstance.interceptors.response.use(
  (response) => {
    settled += 1
    statuses.push(response.status)
    return response
  },
  (error) => {
    settled += 1
    const status = error.response?.status
    if (status === undefined) {
      failures.push(`no HTTP response: ${error.code ?? error.message}`)
    } else {
      statuses.push(status)
      if (status === 429) {
        throttled += 1
      } else {
        failures.push(`HTTP ${status} ${error.response.statusText}: ${JSON.stringify(error.response.data)}`)
      }
    }
    return Promise.reject(error)
  },
)

// One request at a time, as the test's graph depends on the calls' order: these libraries send a
// request whenever their queue fills (and analytics-node sends its very first call alone, at once), so
// two could be in flight together and commit in either order (an identify after the track it names).
async function noRequestInFlight() {
  do {
    await new Promise((resolve) => setTimeout(resolve, 0)) // lets a request just made reach the interceptor
  } while (requestsMade > settled)
}

const methods = new Set(['identify', 'track', 'page', 'screen', 'group', 'alias'])
for (const { method, ...params } of calls) {
  await noRequestInFlight()
  if (!methods.has(method)) {
    console.error(`unknown method ${method}`)
    process.exit(2)
  }
  if (typeof params.timestamp === 'string') {
    params.timestamp = new Date(params.timestamp)
  }
  analytics[method](params, (error) => {
    answered += 1
    if (error) {
      failures.push(`${method} ${params.messageId ?? ''}: ${error}`)
    }
  })
}

// Neither library has closeAndFlush: flush until every call's callback has come back.
const deadline = Date.now() + 60000
while (answered < calls.length && Date.now() < deadline) {
  await noRequestInFlight()
  if (analytics.queue.length > 0) {
    try {
      await analytics.flush()
    } catch (error) {
      failures.push(`flush: ${error}`)
    }
  }
  await new Promise((resolve) => setTimeout(resolve, 20))
}
if (answered < calls.length) {
  failures.push(`${calls.length - answered} of ${calls.length} calls never completed`)
}
if (requestsMade !== statuses.length && failures.length === 0) {
  failures.push(`${requestsMade - statuses.length} of ${requestsMade} requests got no HTTP response`)
}
if (failures.length > 0) {
  console.error(failures.join('\n'))
  process.exit(1)
}
console.log(JSON.stringify({ calls: calls.length, requests: statuses.length, throttled, statuses }))
process.exit(0) // the libraries' flush timers would keep node alive for their interval
