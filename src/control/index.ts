/** The control API (proto/vhost_ts/control.proto) on a Unix socket: the server a backend runs, and a client. */
export { ControlServer } from './control-server.js';
export { ControlClient } from './control-client.js';
