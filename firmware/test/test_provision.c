/* The serial provisioning line protocol. */
#include "testing.h"

#include "../src/core/provision.h"

static proplet_settings_t settings;
static char reply[1024];

static provision_action_t line(const char *text)
{
    return provision_handle_line(&settings, true, text, reply, sizeof reply);
}

static int setup(void **state)
{
    (void)state;
    memset(&settings, 0, sizeof settings);
    return 0;
}

static void provisions_a_fresh_device(void **state)
{
    (void)state;
    line("HELLO");
    assert_string_equal(reply, "+OK propeller-proplet " PROPLET_VERSION " id=- ready=no\n");
    const char *commands[] = {"SET wifi_ssid Lab Net", "SET wifi_pass p@ss word", "set mqtt_url mqtt://10.0.0.2:1883",
                              "SET proplet_id esp-7", "SET domain propeller", "SET channel default\r"};
    for (size_t i = 0; i < sizeof commands / sizeof commands[0]; i++) {
        assert_int_equal(line(commands[i]), PROVISION_NONE);
        assert_string_equal(reply, "+OK\n");
    }
    assert_string_equal(settings.wifi_ssid, "Lab Net");
    assert_string_equal(settings.wifi_pass, "p@ss word");
    assert_string_equal(settings.channel, "default");
    line("hello");
    assert_string_equal(reply, "+OK propeller-proplet " PROPLET_VERSION " id=esp-7 ready=yes\n");
    line("GET wifi_pass");
    assert_string_equal(reply, "+OK ****\n");
    line("GET wifi_ssid");
    assert_string_equal(reply, "+OK Lab Net\n");
    assert_int_equal(line("SAVE"), PROVISION_SAVE);
    assert_int_equal(line("REBOOT"), PROVISION_REBOOT);
    assert_string_equal(reply, "+OK rebooting\n");
}

static void lists_every_key_with_secrets_masked(void **state)
{
    (void)state;
    line("SET mqtt_pass hunter2");
    line("LIST");
    assert_non_null(strstr(reply, "+KEY wifi_ssid=\n"));
    assert_non_null(strstr(reply, "+KEY mqtt_pass=****\n"));
    assert_non_null(strstr(reply, "+KEY trusted_keys=\n"));
    assert_non_null(strstr(reply, "+OK 9 keys\n"));
}

static void explains_every_refusal(void **state)
{
    (void)state;
    line("SET colour blue");
    assert_string_equal(reply, "+ERR unknown key 'colour'; keys: wifi_ssid wifi_pass mqtt_url mqtt_user "
                               "mqtt_pass proplet_id domain channel trusted_keys\n");
    line("SET mqtt_url 10.0.0.2:1883");
    assert_string_equal(reply, "+ERR mqtt_url must look like mqtt://host:port (or mqtts://), got '10.0.0.2:1883'\n");
    char long_line[80] = "SET wifi_ssid ";
    memset(long_line + strlen(long_line), 'x', 40);
    line(long_line);
    assert_string_equal(reply, "+ERR value too long for wifi_ssid (at most 32 bytes)\n");
    line("FLASH");
    assert_string_equal(reply, "+ERR unknown command 'FLASH'; commands: HELLO SET GET LIST SAVE ERASE REBOOT\n");
    char huge[PROVISION_LINE_MAX + 10];
    memset(huge, 'A', sizeof huge - 1);
    huge[sizeof huge - 1] = '\0';
    line(huge);
    assert_string_equal(reply, "+ERR line longer than 319 bytes\n");
    line("");
    assert_string_equal(reply, "");
}

static void provisions_trusted_keys(void **state)
{
    (void)state;
    /* One key as the base64 of its 32 bytes, one as its PEM file's body line (any 32 bytes are
     * a well-formed key here: the curve point is libsodium's business when it verifies). */
    const char *raw = "AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=";
    const char *pem_body = "MCowBQYDK2VwAyEAAgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgI=";
    char command[PROVISION_LINE_MAX];
    snprintf(command, sizeof command, "SET trusted_keys %s, %s", raw, pem_body);
    line(command);
    assert_string_equal(reply, "+OK\n");
    char expected[PROVISION_LINE_MAX];
    snprintf(expected, sizeof expected, "+OK %s, %s\n", raw, pem_body);
    line("GET trusted_keys");
    assert_string_equal(reply, expected); /* public keys: not masked */

    /* Four keys in their longer PEM form fit one line and the setting. */
    snprintf(command, sizeof command, "SET trusted_keys %s, %s, %s, %s", pem_body, pem_body, pem_body,
             pem_body);
    line(command);
    assert_string_equal(reply, "+OK\n");

    /* A key that is not one is refused at once and the old value kept. */
    line("SET trusted_keys MCowBQYDK2VuAyEAAgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgI=");
    assert_string_equal(reply, "+ERR trusted_keys: trusted key 1 is not an Ed25519 public key: give the "
                               "base64 of its 32 bytes, or the body line of its PEM file\n");
    snprintf(command, sizeof command, "SET trusted_keys %s,%s,%.43s", raw, raw, raw);
    line(command);
    assert_string_equal(reply, "+ERR trusted_keys: trusted key 3 is not an Ed25519 public key: give the "
                               "base64 of its 32 bytes, or the body line of its PEM file\n");
    assert_non_null(strstr(settings.trusted_keys, pem_body));

    /* Empty: signatures are no longer required. */
    line("SET trusted_keys");
    assert_string_equal(reply, "+OK\n");
    assert_string_equal(settings.trusted_keys, "");
    settings_parse_line(&settings, "trusted_keys=AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=\n");
    assert_string_equal(settings.trusted_keys, raw);
}

static void erases_and_reads_settings_files(void **state)
{
    (void)state;
    line("SET proplet_id a");
    line("ERASE");
    assert_string_equal(settings.proplet_id, "");
    settings_parse_line(&settings, "proplet_id=from-file\n");
    settings_parse_line(&settings, "mqtt_url=mqtt://h:1\r\n");
    settings_parse_line(&settings, "nonsense");
    settings_parse_line(&settings, "unknown=1");
    assert_string_equal(settings.proplet_id, "from-file");
    assert_string_equal(settings.mqtt_url, "mqtt://h:1");
    const char *missing;
    assert_false(settings_ready(&settings, false, &missing));
    assert_string_equal(missing, "domain");
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup(provisions_a_fresh_device, setup),
        cmocka_unit_test_setup(lists_every_key_with_secrets_masked, setup),
        cmocka_unit_test_setup(explains_every_refusal, setup),
        cmocka_unit_test_setup(provisions_trusted_keys, setup),
        cmocka_unit_test_setup(erases_and_reads_settings_files, setup),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
