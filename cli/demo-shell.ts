/**
 * A login shell driven through a console port's socket, as a person types at it: wait for the login prompt, type
 * the user name, wait for the shell's prompt, type commands. Commands go in base64 so that any text (quotes,
 * newlines) survives the terminal, and their output is cut out between markers that the typed line itself does
 * not contain (the terminal echoes what is typed).
 */
import { connect, type Socket } from 'node:net';

const BEGIN = '__VHOST_TS_BEGIN__';
const END = '__VHOST_TS_END__';

export class ConsoleShell {
  private text = '';
  private waiter: (() => void) | null = null;
  private closed = false;

  private constructor(private readonly socket: Socket) {
    socket.on('data', (d: Buffer) => {
      this.text += d.toString('utf8');
      this.waiter?.();
    });
    socket.on('close', () => {
      this.closed = true;
      this.waiter?.();
    });
  }

  static connect(path: string): Promise<ConsoleShell> {
    return new Promise((resolve, reject) => {
      const s = connect(path);
      s.once('connect', () => resolve(new ConsoleShell(s)));
      s.once('error', reject);
    });
  }

  /** Everything the console showed so far. */
  get transcript(): string {
    return this.text;
  }

  /** Wait until the text after `from` matches `re`; resolves with the match and where it ends. */
  expect(re: RegExp, from: number, timeoutMs: number, what: string): Promise<{ match: RegExpMatchArray; end: number }> {
    return new Promise((resolve, reject) => {
      const check = () => {
        const m = this.text.slice(from).match(re);
        if (m) {
          done();
          resolve({ match: m, end: from + (m.index ?? 0) + m[0].length });
        } else if (this.closed) {
          done();
          reject(new Error(`console closed while waiting for ${what}; it showed: ${JSON.stringify(this.text.slice(-400))}`));
        }
      };
      const timer = setTimeout(() => {
        done();
        reject(new Error(`no ${what} on the console within ${Math.round(timeoutMs / 1000)} s; it showed: ${JSON.stringify(this.text.slice(-400))}`));
      }, timeoutMs);
      const done = () => {
        clearTimeout(timer);
        this.waiter = null;
      };
      this.waiter = check;
      check();
    });
  }

  /** Type text (a terminal sends CR for Enter). */
  type(text: string): void {
    this.socket.write(text);
  }

  /** Log in as `user` (no password) and wait for the shell's prompt. */
  async login(user: string, timeoutMs: number): Promise<void> {
    const prompt = await this.expect(/login: $/, 0, timeoutMs, 'login prompt');
    this.type(`${user}\r`);
    await this.expect(/[#$] (\x1b\[\?2004h)?$/, prompt.end, 60_000, 'shell prompt after the login');
  }

  /**
   * Run shell commands in a subshell of the logged-in shell (so an `exit` in them ends only them); resolves with
   * their output (LF line ends) and exit status.
   */
  async run(commands: string, timeoutMs: number): Promise<{ output: string; status: number }> {
    const from = this.text.length;
    const b64 = Buffer.from(commands, 'utf8').toString('base64');
    // "__VHOST_TS_""BEGIN__" as typed (and echoed) is not the marker it prints.
    const [b1, b2] = [BEGIN.slice(0, 10), BEGIN.slice(10)];
    const [e1, e2] = [END.slice(0, 10), END.slice(10)];
    this.type(`stty -echo; echo "${b1}""${b2}"; (eval "$(echo ${b64} | base64 -d)"); rc=$?; echo; echo "${e1}""${e2} $rc"\r`);
    const re = new RegExp(`${BEGIN}\\r?\\n([\\s\\S]*?)\\r?\\n${END} (\\d+)\\r?\\n`);
    const { match } = await this.expect(re, from, timeoutMs, 'end of the commands');
    return { output: match[1].replace(/\r\n/g, '\n'), status: Number(match[2]) };
  }

  close(): void {
    this.socket.destroy();
  }
}
