/** The vhost-user protocol: codec, connection, backend session, server, device interface, queue workers. */
export * from './device.js';
export * from './server.js';
export { BackendSession, MAX_MEM_SLOTS, RequestFailed, type Logger, type QueueStatus } from './session.js';
export { QueueStat } from './queue-runner.js';
export { ADAPTIVE_POLL_MAX_US, type PollSetting } from './poll-window.js';
export { VhostProtocolError } from './errors.js';
export * from './protocol.js';
export * from './codec.js';
