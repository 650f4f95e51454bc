//! patchctl's standard output. When the reader goes away (`| head`, `| grep -q`), the command
//! ends quietly with status 0, as Unix tools do, instead of panicking in `println!`.

use std::io::Write;

/// Writes to standard output; ends the process on a closed pipe (0) or another write error (1).
pub fn write(args: std::fmt::Arguments<'_>) {
    let mut out = std::io::stdout().lock();
    if let Err(e) = out.write_fmt(args).and_then(|()| out.flush()) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("patchctl: cannot write to standard output: {e}");
        std::process::exit(i32::from(crate::failure::FAILED));
    }
}

/// `print!` through [`write`].
#[macro_export]
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::output::write(format_args!($($arg)*))
    };
}

/// `println!` through [`write`].
#[macro_export]
macro_rules! outln {
    () => {
        $crate::output::write(format_args!("\n"))
    };
    ($($arg:tt)*) => {
        $crate::output::write(format_args!("{}\n", format_args!($($arg)*)))
    };
}
